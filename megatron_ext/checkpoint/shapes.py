"""Tensor shapes a `ModelConfig` implies, under HF names: the table every reader checks a checkpoint against
and every synthetic or tiny checkpoint is generated from."""

from __future__ import annotations

from typing import TypeVar

from megatron_ext.checkpoint.mistral_native import hf_decoder_prefix
from megatron_ext.config import DecoderConfig, ModelConfig

T = TypeVar("T")


def decoder_shapes(dec: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Decoder tensor shapes under their HF MistralForCausalLM names (prefix `model.`, `lm_head`)."""
    q, kv = dec.num_attention_heads * dec.kv_channels, dec.num_query_groups * dec.kv_channels
    h, f = dec.hidden_size, dec.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (dec.vocab_size, h)}
    for i in range(dec.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (dec.vocab_size, h)}


def encoder_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Audio tower + projector shapes under HF Voxtral names (k_proj has no bias, as in Whisper)."""
    e = cfg.encoder
    assert e is not None
    d, f = e.hidden_size, e.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "audio_tower.conv1.weight": (d, e.num_mel_bins, 3),
        "audio_tower.conv1.bias": (d,),
        "audio_tower.conv2.weight": (d, d, 3),
        "audio_tower.conv2.bias": (d,),
    }
    for i in range(e.num_layers):
        p = f"audio_tower.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.q_proj.bias": (d,),
            p + "self_attn.k_proj.weight": (d, d),
            p + "self_attn.v_proj.weight": (d, d),
            p + "self_attn.v_proj.bias": (d,),
            p + "self_attn.out_proj.weight": (d, d),
            p + "self_attn.out_proj.bias": (d,),
            p + "self_attn_layer_norm.weight": (d,),
            p + "self_attn_layer_norm.bias": (d,),
            p + "fc1.weight": (f, d),
            p + "fc1.bias": (f,),
            p + "fc2.weight": (d, f),
            p + "fc2.bias": (d,),
            p + "final_layer_norm.weight": (d,),
            p + "final_layer_norm.bias": (d,),
        }
    h = cfg.decoder.hidden_size
    return shapes | {
        "audio_tower.layer_norm.weight": (d,),
        "audio_tower.layer_norm.bias": (d,),
        "multi_modal_projector.linear_1.weight": (h, cfg.projector_input_size),
        "multi_modal_projector.linear_2.weight": (h, h),
    }


def to_hf_names(decoder: dict[str, T], arch: str) -> dict[str, T]:
    """Rename MistralForCausalLM decoder names to `arch`'s HF layout."""
    pre, head = hf_decoder_prefix(arch)
    return {head if n == "lm_head.weight" else pre + n.removeprefix("model."): t for n, t in decoder.items()}
