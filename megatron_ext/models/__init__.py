"""Megatron-Core models: Whisper encoder, audio projector, audio language model.

build.build_model (BuildConfig, FP8Config) -> audio_lm.AudioLanguageModel (audio_encoder.WhisperEncoder,
projector.AudioProjector, rope.DecoderModel); specs.py picks local/TE layers; loading.py loads full
tensors or whole checkpoints at any TP/PP rank; audio_features.py turns audio into log-mel chunks;
logits.py and gpu_check.py back tools/logits.py and tools/gpu_check.py.
"""
