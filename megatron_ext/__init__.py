"""Devstral Audio: a Megatron-Core extension that merges Voxtral's and Devstral's decoders and fine-tunes them."""

__version__ = "0.1.0"
