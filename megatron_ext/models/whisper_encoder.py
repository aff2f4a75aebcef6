"""Whisper-large-v3 encoder (Voxtral's audio tower)."""

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


def conv_stem(
    mel: torch.Tensor, conv1: torch.nn.Conv1d, conv2: torch.nn.Conv1d, positions: torch.Tensor
) -> torch.Tensor:
    """Whisper's stem: log-mel [chunks, mels, frames] -> conv1+GELU, conv2 (stride 2)+GELU, + sinusoids.

    Returns Megatron's sequence-first layout [positions, chunks, d]: the one transpose from HF's [b, s, h].
    """
    frames = positions.shape[0] * conv1.stride[0] * conv2.stride[0]
    if mel.dim() != 3 or mel.shape[1] != conv1.in_channels or mel.shape[2] != frames:
        raise ValueError(
            f"audio features must be [chunks, {conv1.in_channels}, {frames}] (30 s chunks), got {list(mel.shape)}"
        )
    x = torch.nn.functional.gelu(conv1(mel.to(conv1.weight.dtype)))
    x = torch.nn.functional.gelu(conv2(x))  # [chunks, d, positions]
    return (x.permute(2, 0, 1) + positions[:, None, :]).to(conv1.weight.dtype)
