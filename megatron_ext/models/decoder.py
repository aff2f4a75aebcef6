"""The decoder (`DecoderModel`, a GPTModel) and its rotary positions: plain rope / YaRN from
`RopeConfig`, true per-token positions, llama-4 scaling.

Megatron-Core's GPTModel builds rope angles for positions 0..s-1 and ignores `position_ids`; Devstral-2's
"llama-4" query scaling (q *= 1 + beta * ln(1 + floor(pos / original_max_position))) is not in Megatron
at all. `DecoderModel` (a GPTModel) therefore:
- takes rope angles from Megatron's own `RotaryEmbedding`/`YarnRotaryEmbedding` table, indexed by the
  given `position_ids` (so packed samples restarting at 0, or CP-sliced positions, get their true angles);
  with THD packing (`packed_seq_params`), Megatron already restarts rope per sub-sequence;
- computes the llama-4 per-token query scale from the same true positions (position_ids, else the THD
  cu_seqlens, under CP taken at this rank's load-balanced slices, else 0..s-1 sliced like Megatron slices a
  context-parallel sequence) and hands it to
  `QueryScaledSelfAttention` as one extra channel of the rope tensor, which Megatron passes to every layer
  and saves for activation recompute (THD: the attention derives it from the sub-sequence boundaries);
  with a static KV cache, the scale of the new queries is written at their cache slots from the given
  true positions (rope stays indexed by cache slot, which is relative and so unchanged by left padding).
The scale is applied to q before rope; rope is linear per token, so this equals HF's "after rope".
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttention

from megatron_ext.config import RopeConfig
from megatron_ext.models.cp_audio import partition_index


def rope_config_attributes(rope: RopeConfig) -> dict[str, Any]:
    """TransformerConfig attributes the decoder reads beyond the declared fields: YaRN (all explicit; GPTModel
    reads them, TransformerConfig 0.16 does not declare them) and the llama-4 query scaling."""
    out: dict[str, Any] = {}
    if rope.llama4_scaling_beta is not None:
        out["llama4_scaling_beta"] = float(rope.llama4_scaling_beta)
        out["llama4_original_max_position_embeddings"] = int(rope.original_max_position_embeddings)
    return out | yarn_config_attributes(rope)


def yarn_config_attributes(rope: RopeConfig) -> dict[str, Any]:
    """The `yarn_*` TransformerConfig attributes GPTModel reads: every YaRN setting, explicit."""
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


def thd_rank_positions(cu_seqlens_padded: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Positions inside their documents of the THD tokens CP rank `rank` holds (all of them at cp=1), in its order."""
    positions = thd_positions(cu_seqlens_padded, int(cu_seqlens_padded[-1]))
    return positions if cp == 1 else positions[partition_index(cu_seqlens_padded, cp, rank)]


def pack_query_scale(angles: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Append the per-token query scale to the rope angles as one extra channel: [s, b, 1, dim + 1].

    Megatron hands `rotary_pos_emb` to every layer and saves it as a tensor for activation recompute, so the
    scale travels (and is recomputed) with it; `QueryScaledSelfAttention` splits it off again.
    """
    batch = max(angles.shape[1], scale.shape[1])
    return torch.cat([angles.expand(-1, batch, -1, -1), scale.to(angles.dtype).expand(-1, batch, -1, -1)], dim=-1)


class QueryScaledSelfAttention(SelfAttention):
    """SelfAttention with Devstral-2's llama-4 query scaling (config attribute `llama4_scaling_beta`).

    The per-token scale comes packed in the rope tensor (BSHD; see `pack_query_scale`) or, for THD packing,
    is computed here from the sub-sequence boundaries. Without a beta this is plain SelfAttention.
    """

    _query_scale: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any):
        rot, packed = kwargs.get("rotary_pos_emb"), kwargs.get("packed_seq_params")
        beta = getattr(self.config, "llama4_scaling_beta", None)
        if isinstance(rot, torch.Tensor) and rot.shape[-1] == self.config.kv_channels + 1:
            self._query_scale, kwargs["rotary_pos_emb"] = rot[..., -1:], rot[..., :-1]
        elif beta is not None and packed is not None and packed.qkv_format == "thd":
            self._query_scale = self._thd_scale(packed, beta)
        context = kwargs.get("inference_context")
        if self._query_scale is not None and context is not None and context.is_static_batching():
            queries = (args[0] if args else kwargs["hidden_states"]).shape[0]  # the cache slots of the new queries
            start = context.sequence_len_offset
            self._query_scale = self._query_scale[start : start + queries]
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._query_scale = None

    def _thd_scale(self, packed, beta: float) -> torch.Tensor:
        cu = packed.cu_seqlens_q_padded if packed.cu_seqlens_q_padded is not None else packed.cu_seqlens_q
        cp = self.config.context_parallel_size
        rank = self.pg_collection.cp.rank() if cp > 1 else 0
        positions = thd_rank_positions(cu, cp, rank)[:, None, None, None]  # [t, 1, 1, 1] like the THD query
        return llama4_query_scale(positions, beta, self.config.llama4_original_max_position_embeddings)

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

    def _rope_table(self, length: int) -> torch.Tensor:
        """Angles for positions 0..length-1, before any context-parallel slicing: [length, 1, 1, dim]."""
        out = self.rotary_pos_emb.get_emb(length)
        return out[0] if isinstance(out, tuple) else out  # YaRN returns (angles, mscale)

    def _preprocess(
        self, input_ids, position_ids, decoder_input=None, inference_context=None, packed_seq_params=None, **kwargs: Any
    ):
        out = super()._preprocess(
            input_ids, position_ids, decoder_input, inference_context, packed_seq_params, **kwargs
        )
        rot = out[1]
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if rot is not None and inference_context is not None:
            return (out[0], self._inference_query_scale(rot, position_ids, inference_context), *out[2:])
        if rot is None or thd:
            return out  # THD: Megatron restarts rope per sub-sequence; the attention derives the query scale
        if position_ids is not None:
            # [b, s] positions -> [s, b, 1, dim] angles from Megatron's own table (exactly its values).
            table = self._rope_table(int(position_ids.max()) + 1)
            rot = table[:, 0, 0][position_ids.t().long()].unsqueeze(2)
        beta = getattr(self.config, "llama4_scaling_beta", None)
        if beta is not None:
            scale = llama4_query_scale(
                self._true_positions(position_ids, rot), beta, self.config.llama4_original_max_position_embeddings
            )
            rot = pack_query_scale(rot, scale)
        return (out[0], rot, *out[2:])

    def _inference_query_scale(self, rot: torch.Tensor, position_ids: torch.Tensor | None, context) -> torch.Tensor:
        """KV-cache decoding: rope stays Megatron's table over cache slots (relative, so left padding is harmless);
        the llama-4 scale of the new queries comes from their true `position_ids` [b, s], written at their cache
        slots so the attention slices it like the rope table."""
        beta = getattr(self.config, "llama4_scaling_beta", None)
        if beta is None:
            return rot
        if position_ids is None:
            raise ValueError("llama-4 query scaling with a KV cache needs the new tokens' true position_ids")
        start, length = context.sequence_len_offset, position_ids.shape[1]
        scale = torch.ones(rot.shape[0], position_ids.shape[0], 1, 1, device=rot.device)
        scale[start : start + length] = llama4_query_scale(
            position_ids.t()[:, :, None, None], beta, self.config.llama4_original_max_position_embeddings
        )
        return pack_query_scale(rot, scale)

    def _true_positions(self, position_ids: torch.Tensor | None, rot: torch.Tensor) -> torch.Tensor:
        """Positions as [s, b, 1, 1] matching the local query layout (context-parallel slice included)."""
        if position_ids is not None:
            return position_ids.t()[:, :, None, None]
        length = rot.shape[0] * self.config.context_parallel_size
        pos = torch.arange(length, device=rot.device)[:, None, None, None]
        cp_group = self.pg_collection.cp
        if cp_group is not None and cp_group.size() > 1:
            pos = get_pos_emb_on_this_cp_rank(pos, 0, cp_group)
        return pos
