"""Megatron-Core models: Whisper encoder, audio projector, audio language model."""
