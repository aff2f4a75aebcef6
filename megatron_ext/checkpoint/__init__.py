"""Checkpoint formats: HF safetensors, Mistral-native consolidated files, Megatron torch_dist."""
