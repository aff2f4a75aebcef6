"""Compatibility shims for running Megatron-Core where it normally needs CUDA."""
