"""Megatron-Core models: Whisper encoder, audio projector, decoder, audio language model.

build.build_model (BuildConfig, FP8Config) -> audio_lm.AudioLanguageModel (whisper_encoder.WhisperEncoder,
projector.AudioProjector, decoder.DecoderModel: GPTModel with true-position rope/YaRN and llama-4 query
scaling); specs.py picks local/TE layers; loading.py loads full tensors or whole checkpoints at any TP/PP
rank; logits.py backs tools/logits.py. Audio decoding and the log-mel front-end live in megatron_ext.audio.
"""
