"""LM-head + cross-entropy on supervised tokens only, in chunks, never materialising [s, vocab/TP] logits.

The stock path computes logits for every position and keeps them (plus the softmax) for backward: at
seq 131072, vocab 131072, TP 4 that is 131072 x 32768 x 4 B = 17.2 GB of fp32 logits, ~26 GB with the
saved softmax and bf16 copy. Here only positions with loss_mask = 1 go through the LM head, `chunk`
tokens at a time under activation checkpointing, so the live peak is one chunk's logits, softmax and
gradient: 3 x chunk x vocab/TP x 4 B = 1.6 GB for chunk 4096 at TP 4 (0.4 GB at chunk 1024), whatever
the sequence length. Vocab-parallel cross entropy (Megatron-Core) reduces over the TP group.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from torch.utils.checkpoint import checkpoint


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = torch.matmul(hidden, weight.t()).float()  # [n, vocab/TP]
    return tensor_parallel.vocab_parallel_cross_entropy(logits[:, None], targets[:, None])[:, 0]


def supervised_token_losses(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk: int,
    sequence_parallel: bool,
) -> torch.Tensor:
    """Per-token cross entropy [n_supervised] for positions where `loss_mask` is set.

    hidden: decoder output [s(/TP if sequence_parallel), b, h]; output_weight: this rank's [vocab/TP, h]
    LM-head shard; labels, loss_mask: [b, s]. Order of the result: batch-major (b, then s), i.e. the
    order of `loss_mask.nonzero()`.
    """
    if sequence_parallel:  # all-gather along s forward, reduce-scatter of the gradient backward
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden)
    flat = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])  # [b*s, h], batch-major
    index = loss_mask.reshape(-1).nonzero().squeeze(1)
    selected, targets = flat.index_select(0, index), labels.reshape(-1).index_select(0, index)
    if not sequence_parallel:  # identity forward, all-reduce of the input gradient over TP backward (column
        # parallel). Here, not before the transpose: Megatron all-reduces `grad.contiguous()` and returns `grad`,
        # so a transposed (micro-batch > 1) gradient would come back unreduced.
        selected = tensor_parallel.copy_to_tensor_model_parallel_region(selected)
    losses = []
    for start in range(0, len(index), chunk):
        h, t = selected[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            losses.append(checkpoint(_chunk_loss, h, output_weight, t, use_reentrant=False))
        else:
            losses.append(_chunk_loss(h, output_weight, t))
    if not losses:
        return selected.new_zeros(0).float() + 0.0 * output_weight.sum()
    return torch.cat(losses)
