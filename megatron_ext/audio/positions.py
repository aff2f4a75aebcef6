"""Whisper's fixed sinusoidal position table: shared by the encoder model and by checkpoint I/O (which
recomputes or verifies `embed_positions`), so it sits below both."""

from __future__ import annotations

import math

import torch


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positional table [length, channels]: sin half then cos half (never trained)."""
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even channel count, got {channels}")
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled_time = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)
