"""SFT on Megatron-Core: config schema, training loop, loss, checkpoints, logging."""
