"""Rope pieces: YaRN frequencies vs HF at the real Devstral-2 settings, llama-4 scale, packed positions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_ext.compat.cpu import apply_cpu_patches
from megatron_ext.config import DecoderConfig, ModelConfig, RopeConfig
from megatron_ext.models.decoder import llama4_query_scale, thd_positions, yarn_config_attributes

DEVSTRAL2_ROPE = RopeConfig(
    theta=1e8,
    type="yarn",
    factor=48.0,
    original_max_position_embeddings=8192,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
    llama4_scaling_beta=0.1,
)


def _megatron_yarn(rope: RopeConfig, head_dim: int = 128) -> tuple[torch.Tensor, float]:
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    apply_cpu_patches()
    a = yarn_config_attributes(rope)
    emb = YarnRotaryEmbedding(
        head_dim,
        rotary_base=rope.theta,
        use_cpu_initialization=True,
        scaling_factor=a["yarn_rotary_scaling_factor"],
        original_max_position_embeddings=a["yarn_original_max_position_embeddings"],
        beta_fast=a["yarn_beta_fast"],
        beta_slow=a["yarn_beta_slow"],
        mscale=a["yarn_mscale"],
        mscale_all_dim=a["yarn_mscale_all_dim"],
        correction_range_round_to_int=a["yarn_correction_range_round_to_int"],
    )
    angles, mscale = emb.get_emb(2)
    return angles[1, 0, 0, : head_dim // 2], mscale  # position 1: the inverse frequencies


def _hf_yarn(rope: RopeConfig) -> tuple[torch.Tensor, float]:
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dec = DecoderConfig(
        num_layers=1,
        hidden_size=5120,
        ffn_hidden_size=32768,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=128,
        vocab_size=131072,
        max_position_embeddings=393216,
        rope=rope,
    )
    hf = ModelConfig(dec, hf_architecture="ministral3").to_hf()
    hf.pop("architectures")
    return ROPE_INIT_FUNCTIONS["yarn"](transformers.Ministral3Config(**hf), "cpu")


def test_yarn_matches_hf_at_devstral2_settings() -> None:
    ours, our_scale = _megatron_yarn(DEVSTRAL2_ROPE)
    ref, ref_scale = _hf_yarn(DEVSTRAL2_ROPE)
    assert torch.equal(ours, ref)
    assert our_scale == pytest.approx(ref_scale, rel=0, abs=1e-12)


def test_correction_range_rounding_follows_truncate() -> None:
    """HF truncate=False and Megatron round_to_int=False agree too, and differ from the rounded range."""
    loose = dataclasses.replace(DEVSTRAL2_ROPE, truncate=False)
    ours, _ = _megatron_yarn(loose)
    ref, _ = _hf_yarn(loose)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)
    rounded, _ = _megatron_yarn(DEVSTRAL2_ROPE)
    assert not torch.allclose(ours, rounded, rtol=1e-3, atol=0)


def test_yarn_attributes_are_all_explicit() -> None:
    attrs = yarn_config_attributes(DEVSTRAL2_ROPE)
    assert set(attrs) == {
        "yarn_rotary_scaling_factor",
        "yarn_original_max_position_embeddings",
        "yarn_beta_fast",
        "yarn_beta_slow",
        "yarn_mscale",
        "yarn_mscale_all_dim",
        "yarn_correction_range_round_to_int",
    }
    assert attrs["yarn_mscale_all_dim"] == 1.0 and attrs["yarn_correction_range_round_to_int"] is True
    assert yarn_config_attributes(RopeConfig(theta=1e8)) == {}


def test_llama4_scale_matches_hf_formula() -> None:
    from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale

    positions = torch.tensor([[0, 1, 8191, 8192, 16384, 100000, 393215]])
    ref = get_llama_4_attn_scale(positions, 0.1, 8192)[:, 0, :, 0]
    assert torch.allclose(llama4_query_scale(positions, 0.1, 8192), ref, rtol=0, atol=1e-7)


def test_thd_positions_restart_per_packed_sequence() -> None:
    cu = torch.tensor([0, 3, 7, 8], dtype=torch.int32)
    assert thd_positions(cu, 8).tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
