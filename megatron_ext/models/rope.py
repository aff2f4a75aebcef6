"""Rotary positions for the decoder: plain rope / YaRN from `RopeConfig`, true per-token positions, llama-4 scaling.

Megatron-Core's GPTModel builds rope angles for positions 0..s-1 and ignores `position_ids`; Devstral-2's
"llama-4" query scaling (q *= 1 + beta * ln(1 + floor(pos / original_max_position))) is not in Megatron
at all. `DecoderModel` (a GPTModel) therefore:
- takes rope angles from Megatron's own `RotaryEmbedding`/`YarnRotaryEmbedding` table, indexed by the
  given `position_ids` (so packed samples restarting at 0, or CP-sliced positions, get their true angles);
  with THD packing (`packed_seq_params`), Megatron already restarts rope per sub-sequence;
- computes the llama-4 per-token query scale from the same true positions (position_ids, else the THD
  cu_seqlens, else 0..s-1 sliced like Megatron slices a context-parallel sequence) and hands it to
  `QueryScaledSelfAttention` inside the rope argument, which survives activation recompute.
The scale is applied to q before rope; rope is linear per token, so this equals HF's "after rope".
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttention

from megatron_ext.config import RopeConfig


def yarn_config_attributes(rope: RopeConfig) -> dict[str, Any]:
    """The `yarn_*` TransformerConfig attributes GPTModel reads (0.16 does not declare them): all explicit."""
    if rope.type != "yarn":
        return {}
    return {
        "yarn_rotary_scaling_factor": float(rope.factor),
        "yarn_original_max_position_embeddings": int(rope.original_max_position_embeddings),
        "yarn_beta_fast": float(rope.beta_fast),
        "yarn_beta_slow": float(rope.beta_slow),
        "yarn_mscale": float(rope.mscale),
        "yarn_mscale_all_dim": float(rope.mscale_all_dim),
        # HF `truncate` rounds the correction range (floor/ceil) exactly like this flag.
        "yarn_correction_range_round_to_int": bool(rope.truncate),
    }


def llama4_query_scale(positions: torch.Tensor, beta: float, original_max_position: int) -> torch.Tensor:
    """1 + beta * ln(1 + floor(pos / original_max_position)), same shape as `positions` (float32)."""
    return 1.0 + beta * torch.log1p(torch.floor(positions.float() / original_max_position))


def thd_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Per-token position inside its packed sub-sequence, from cumulative sequence lengths."""
    idx = torch.arange(total, device=cu_seqlens.device)
    seg = torch.searchsorted(cu_seqlens[1:].to(idx.dtype), idx, right=True)
    return idx - cu_seqlens[seg].to(idx.dtype)


class RotaryArgs(tuple):
    """(q angles, k angles) as Megatron expects, plus an optional per-token query scale [s, b, 1, 1]."""

    query_scale: torch.Tensor | None

    def __new__(cls, q_emb: torch.Tensor, k_emb: torch.Tensor, query_scale: torch.Tensor | None) -> RotaryArgs:
        obj = super().__new__(cls, (q_emb, k_emb))
        obj.query_scale = query_scale
        return obj


class QueryScaledSelfAttention(SelfAttention):
    """SelfAttention that multiplies queries by `RotaryArgs.query_scale` (llama-4 scaling) when one is given."""

    _query_scale: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any):
        self._query_scale = getattr(kwargs.get("rotary_pos_emb"), "query_scale", None)
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._query_scale = None

    def get_query_key_value_tensors(self, *args: Any, **kwargs: Any):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        if self._query_scale is None:
            return out
        if kwargs.get("split_qkv") is False:
            raise RuntimeError("llama-4 query scaling needs split q/k/v: disable fused_single_qkv_rope")
        query = out[0] * self._query_scale.to(out[0].dtype)
        return (query, *out[1:])


class DecoderModel(GPTModel):
    """GPTModel whose rope follows the true per-token positions and carries the llama-4 query scale."""

    def __init__(self, *args: Any, rope: RopeConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rope = rope

    def _rope_table(self, length: int) -> torch.Tensor:
        """Angles for positions 0..length-1, before any context-parallel slicing: [length, 1, 1, dim]."""
        out = self.rotary_pos_emb.get_emb(length)
        return out[0] if isinstance(out, tuple) else out  # YaRN returns (angles, mscale)

    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                    packed_seq_params=None, **kwargs: Any):
        out = super()._preprocess(input_ids, position_ids, decoder_input, inference_context, packed_seq_params,
                                  **kwargs)
        rot = out[1]
        if rot is None or inference_context is not None:
            return out
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if position_ids is not None and not thd:
            # [b, s] positions -> [s, b, 1, dim] angles from Megatron's own table (exactly its values).
            table = self._rope_table(int(position_ids.max()) + 1)
            rot = table[:, 0, 0][position_ids.t().long()].unsqueeze(2)
        scale = None
        if self.rope.llama4_scaling_beta is not None:
            pos = self._true_positions(position_ids, packed_seq_params, thd, rot)
            scale = llama4_query_scale(pos, self.rope.llama4_scaling_beta, self.rope.original_max_position_embeddings)
        if scale is None and (position_ids is None or thd):
            return out
        return (out[0], RotaryArgs(rot, rot, scale), *out[2:])

    def _true_positions(self, position_ids, packed_seq_params, thd: bool, rot: torch.Tensor) -> torch.Tensor:
        """Positions as [s, b, 1, 1] (or [t, 1, 1, 1] for THD) matching the local query layout."""
        if position_ids is not None:
            return position_ids.t()[:, :, None, None]
        if thd:
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            return thd_positions(cu, int(cu[-1]))[:, None, None, None]
        length = rot.shape[0] * self.config.context_parallel_size
        pos = torch.arange(length, device=rot.device)[:, None, None, None]
        cp_group = self.pg_collection.cp
        if cp_group is not None and cp_group.size() > 1:
            pos = get_pos_emb_on_this_cp_rank(pos, 0, cp_group)
        return pos
