"""Tiny stand-ins in the layouts the parents are published in (HUB_FORMATS.md), sizes shrunk.

Devstral Small 2: HF `Mistral3ForConditionalGeneration` (ministral3 text model with YaRN + llama-4 scaling,
per-tensor FP8 text linears with 0-dim `weight_scale_inv` / `activation_scale`, a Pixtral vision tower and
projector left unquantised, legacy `language_model.*` names, sharded) and Mistral-native (split
`consolidated-0000N-of-0000M`, `qscale_weight` / `qscale_act`, params.json with yarn, llama_4_scaling,
quantization and vision_encoder blocks). Voxtral Small and Devstral Small 2507: sharded HF and native.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from megatron_ext.checkpoint.mistral_native import convert_name, half_to_interleaved, rope_heads
from megatron_ext.config import ModelConfig

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
# Tiny Pixtral tower: 1 layer, 32 wide, 2 heads, 4x4 patches (the published one: 24 layers, 1024, 16, 14x14).
VISION = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
VISION |= {"patch_size": 4, "image_size": 32, "num_channels": 3, "head_dim": 16}
SPATIAL_MERGE = 2
NOT_CONVERTED = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def write_json(path: Path, data: dict, sort: bool = True) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=sort) + "\n")


def write_shards(out: Path, tensors: dict[str, torch.Tensor], stem: str, count: int, index: bool) -> None:
    """`count` files `{stem}-0000N-of-0000M.safetensors` (tensors in name order), plus an HF index if asked."""
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    per = -(-len(names) // count)
    weight_map = {}
    for k in range(count):
        file = f"{stem}-{k + 1:05d}-of-{count:05d}.safetensors"
        part = {n: tensors[n] for n in names[k * per : (k + 1) * per]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    if index:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        params = sum(t.numel() for n, t in tensors.items() if not n.endswith(("_scale_inv", "activation_scale")))
        meta = {"total_parameters": params, "total_size": total}
        write_json(out / "model.safetensors.index.json", {"metadata": meta, "weight_map": weight_map})


def vision_shapes(text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Pixtral tower + Mistral3 projector shapes under the names transformers 5.24 saves (legacy prefixes)."""
    h, f, p = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "vision_tower.patch_conv.weight": (h, VISION["num_channels"], p, p),
        "vision_tower.ln_pre.weight": (h,),
    }
    for i in range(VISION["num_hidden_layers"]):
        pre = f"vision_tower.transformer.layers.{i}."
        shapes |= {pre + "attention_norm.weight": (h,), pre + "ffn_norm.weight": (h,)}
        shapes |= {pre + f"attention.{x}_proj.weight": (h, h) for x in "qkvo"}
        shapes |= {pre + "feed_forward.gate_proj.weight": (f, h), pre + "feed_forward.up_proj.weight": (f, h)}
        shapes[pre + "feed_forward.down_proj.weight"] = (h, f)
    return shapes | {
        "multi_modal_projector.norm.weight": (h,),
        "multi_modal_projector.patch_merger.merging_layer.weight": (h, h * SPATIAL_MERGE**2),
        "multi_modal_projector.linear_1.weight": (text_hidden, h),
        "multi_modal_projector.linear_2.weight": (text_hidden, text_hidden),
    }


def native_vision_name(hf: str) -> str:
    """Legacy HF vision name -> Mistral-native (`vision_encoder.*`, `vision_language_adapter.*`, ...)."""
    for old, new in (
        ("multi_modal_projector.patch_merger.", "patch_merger."),
        ("multi_modal_projector.norm.", "pre_mm_projector_norm."),
        ("multi_modal_projector.linear_1.", "vision_language_adapter.w_in."),
        ("multi_modal_projector.linear_2.", "vision_language_adapter.w_out."),
        ("vision_tower.", "vision_encoder."),
    ):
        hf = hf.replace(old, new) if hf.startswith(old) else hf
    for old, new in (("_proj.weight", ".weight"), ("gate.", "w1."), ("down.", "w2."), ("up.", "w3.")):
        hf = hf.replace(old, new) if "feed_forward" in hf else hf
    for x in "qkvo":
        hf = hf.replace(f"attention.{x}_proj.", f"attention.w{x}.")
    return hf


def quantize(sd: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Decoder linears -> per-tensor F8_E4M3 + 0-dim fp32 `weight_scale_inv` (w = fp8 x scale) + `activation_scale`."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if ".layers." in name and name.endswith("proj.weight"):
            scale = t.abs().max() / FP8_MAX
            stem = name.removesuffix("weight")
            out[name] = (t / scale).to(torch.float8_e4m3fn)
            out[stem + "weight_scale_inv"] = scale.reshape(()).to(torch.float32)
            out[stem + "activation_scale"] = (0.01 + 0.02 * torch.rand((), generator=gen)).to(torch.float32)
        else:
            out[name] = t
    return out


def mistral3_config(cfg: ModelConfig) -> dict[str, Any]:
    """Devstral Small 2's config.json (Mistral3, ministral3 text model, top-level FP8 block), shrunk to `cfg`."""
    d, rope = cfg.decoder, cfg.decoder.rope
    text = {
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": d.kv_channels,
        "hidden_act": "silu",
        "hidden_size": d.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": d.ffn_hidden_size,
        "max_position_embeddings": d.max_position_embeddings,
        "model_type": "ministral3",
        "num_attention_heads": d.num_attention_heads,
        "num_hidden_layers": d.num_layers,
        "num_key_value_heads": d.num_query_groups,
        "pad_token_id": 11,
        "rms_norm_eps": d.norm_eps,
        "rope_parameters": {
            "beta_fast": rope.beta_fast,
            "beta_slow": rope.beta_slow,
            "factor": rope.factor,
            "llama_4_scaling_beta": rope.llama4_scaling_beta,
            "mscale": rope.mscale,
            "mscale_all_dim": rope.mscale_all_dim,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
            "rope_theta": rope.theta,
            "rope_type": "yarn",
            "type": "yarn",
        },
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": d.vocab_size,
    }
    vision = {
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_type": "pixtral",
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        **VISION,
    }
    return {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "dtype": "float32",  # bfloat16 as published; fp32 here so logits compare at 1e-5
        "image_token_index": 10,
        "model_type": "mistral3",
        "multimodal_projector_bias": False,
        "projector_hidden_act": "gelu",
        "quantization_config": {
            "activation_scheme": "static",
            "dequantize": False,
            "modules_to_not_convert": NOT_CONVERTED,
            "quant_method": "fp8",
            "weight_block_size": None,
        },
        "spatial_merge_size": SPATIAL_MERGE,
        "text_config": text,
        "tie_word_embeddings": False,
        "transformers_version": "5.0.0rc1",
        "vision_config": vision,
        "vision_feature_layer": -1,
    }


def devstral2_params(cfg: ModelConfig) -> dict[str, Any]:
    """Devstral Small 2's params.json (schema of the published Devstral 2 files), shrunk to `cfg`."""
    d, rope = cfg.decoder, cfg.decoder.rope
    v = VISION
    return {
        **plain_params(cfg),
        "tied_embeddings": False,
        "max_position_embeddings": d.max_position_embeddings,
        "q_lora_rank": None,
        "qk_rope_head_dim": None,
        "qk_nope_head_dim": None,
        "kv_lora_rank": None,
        "v_head_dim": None,
        "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"},
        "yarn": {
            "original_max_position_embeddings": rope.original_max_position_embeddings,
            "factor": rope.factor,
            "apply_scale": False,  # HF mscale_all_dim 1.0
            "beta": rope.beta_fast,
            "alpha": rope.beta_slow,
        },
        "llama_4_scaling": {
            "original_max_position_embeddings": rope.original_max_position_embeddings,
            "beta": rope.llama4_scaling_beta,
        },
        "vision_encoder": {
            "image_token_id": 10,
            "image_break_token_id": 12,
            "image_end_token_id": 13,
            "intermediate_size": v["intermediate_size"],
            "num_hidden_layers": v["num_hidden_layers"],
            "num_attention_heads": v["num_attention_heads"],
            "mm_projector_id": "patch_merge",
            "spatial_merge_size": SPATIAL_MERGE,
            "hidden_size": v["hidden_size"],
            "num_channels": v["num_channels"],
            "image_size": v["image_size"],
            "max_image_size": v["image_size"],
            "patch_size": v["patch_size"],
            "rope_theta": 10000.0,
            "add_pre_mm_projector_layer_norm": True,
            "adapter_bias": False,
        },
    }


def voxtral_params(cfg: ModelConfig) -> dict[str, Any]:
    """Voxtral's params.json with the `multimodal.whisper_model_args` blocks vLLM requires."""
    d, e = cfg.decoder, cfg.encoder
    assert e is not None
    return {
        **plain_params(cfg),
        "max_seq_len": d.max_position_embeddings,
        "multimodal": {
            "whisper_model_args": {
                "encoder_args": {
                    "dim": e.hidden_size,
                    "n_layers": e.num_layers,
                    "hidden_dim": e.ffn_hidden_size,
                    "n_heads": e.num_attention_heads,
                    "head_dim": e.hidden_size // e.num_attention_heads,
                    "vocab_size": 51866,
                    "max_source_positions": e.max_source_positions,
                    "causal": False,
                    "audio_encoding_args": {
                        "num_mel_bins": e.num_mel_bins,
                        "window_size": 400,
                        "sampling_rate": 16000,
                        "hop_length": 160,
                    },
                },
                "downsample_args": {"downsample_factor": cfg.projector_stack},
            }
        },
    }


def plain_params(cfg: ModelConfig) -> dict[str, Any]:
    """Devstral Small 2507's params.json: exactly its nine keys, the decoder block every published params.json
    starts with (in this order)."""
    d = cfg.decoder
    return {
        "dim": d.hidden_size,
        "n_layers": d.num_layers,
        "head_dim": d.kv_channels,
        "hidden_dim": d.ffn_hidden_size,
        "n_heads": d.num_attention_heads,
        "n_kv_heads": d.num_query_groups,
        "rope_theta": d.rope.theta,
        "norm_eps": d.norm_eps,
        "vocab_size": d.vocab_size,
    }


def native_names(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF decoder/audio tensors (CausalLM or Voxtral names, FP8 triplets included) -> Mistral-native ones."""
    out = {}
    for name, t in hf.items():
        if name == "audio_tower.embed_positions.weight":
            continue  # recomputed by every loader; not stored natively
        stem, _, suffix = name.rpartition(".")
        native_suffix = {"weight_scale_inv": "qscale_weight", "activation_scale": "qscale_act"}.get(suffix)
        base = f"{stem}.weight" if native_suffix else name
        heads = None if native_suffix else rope_heads(name, cfg)
        native = convert_name(base, cfg.hf_architecture, to_hf=False)
        if native_suffix:
            native = native.removesuffix("weight") + native_suffix
        out[native] = half_to_interleaved(t, heads) if heads else t
    return out


def renamed(sd: dict[str, torch.Tensor], rename: Callable[[str], str]) -> dict[str, torch.Tensor]:
    return {rename(n): t for n, t in sd.items()}
