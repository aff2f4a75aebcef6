"""Pipeline parallelism in SFT: the activation shape the schedule exchanges, and the loss every stage logs.

Each stage holds a contiguous block of decoder layers (`build_model` picks them from parallel_state); the
first also holds the embedding, the audio encoder and the projector, the last the final norm and LM head.
Every stage reads the same micro-batches (positions and the attention layout are needed everywhere), but only
the first encodes audio and only the last computes the loss; Megatron-Core's schedule sends the hidden
states [s, b, h] between stages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def schedule_shape(seq_length: int, micro_batch_size: int, packed: bool) -> tuple[int, int]:
    """(seq_length, micro_batch_size) the schedule sizes its P2P buffers by: under THD (`packed`) a micro-batch's
    rows travel as one flat stream, [b*s, 1, h]."""
    return (seq_length * micro_batch_size, 1) if packed else (seq_length, micro_batch_size)


def from_last_stage(values: torch.Tensor) -> torch.Tensor:
    """`values` as the last pipeline stage holds them, on every stage (the loss exists only there)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return values
    dist.broadcast(
        values,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return values
