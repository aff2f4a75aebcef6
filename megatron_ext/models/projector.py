"""Voxtral's audio projector on Megatron-Core: stack 4 consecutive encoder frames, linear, GELU, linear.

Megatron's `MultimodalProjector` ("mlp": column-parallel fc1, row-parallel fc2, no biases here) does the
MLP, so the checkpoint names are `audio_projector.encoder.linear_fc{1,2}.weight`.
"""

from __future__ import annotations

import torch
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig


class AudioProjector(MultimodalProjector):
    """Encoder output [frames, chunks, d] -> audio embeddings [chunks * frames / stack, decoder hidden]."""

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules, encoder_hidden: int, stack: int) -> None:
        super().__init__(config, submodules, "mlp", input_size=encoder_hidden * stack)
        self.stack = stack

    def forward(self, encoder_out: torch.Tensor) -> torch.Tensor:
        frames, chunks, d = encoder_out.shape
        if frames % self.stack:
            raise ValueError(f"encoder frames per chunk ({frames}) not divisible by projector stack {self.stack}")
        # Back to [chunks, frames, d] before stacking: consecutive frames of one chunk form one row (as HF).
        stacked = encoder_out.transpose(0, 1).reshape(-1, 1, d * self.stack)  # [tokens, 1, d*stack]
        return super().forward(stacked).squeeze(1)
