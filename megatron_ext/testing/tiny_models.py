"""Tiny, seeded stand-ins for the parent models (Voxtral, Devstral, Devstral-2) and their tokenizers.

A shared random base decoder plus a small Devstral delta and a larger, different Voxtral delta, so
merges are meaningful. Shapes keep Mistral Small 3's ratios (GQA 8q/2kv, heads*head_dim != hidden,
SwiGLU, untied head, theta 1e8). Every tensor is random, norms included, so a mapping error shows in
the logits. Everything is written byte-identically for a given seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_ext.audio.positions import sinusoids
from megatron_ext.checkpoint.mistral_native import (
    convert_name,
    half_to_interleaved,
    params_from_config,
    rope_heads,
)
from megatron_ext.checkpoint.shapes import decoder_shapes, encoder_shapes, to_hf_names
from megatron_ext.config import DecoderConfig, EncoderConfig, ModelConfig, RopeConfig
from megatron_ext.tokenizer.tekken_builder import (
    COMMON_SPECIALS,
    DEVSTRAL_SPECIALS,
    VOXTRAL_SPECIALS,
    build_tekken,
    devstral_spec,
    voxtral_spec,
    write_tekken,
)

VOCAB_SIZE = 2048
TINY_DECODER = DecoderConfig(
    num_layers=2,
    hidden_size=96,
    ffn_hidden_size=384,
    num_attention_heads=8,
    num_query_groups=2,
    kv_channels=16,
    vocab_size=VOCAB_SIZE,
    norm_eps=1e-5,
    max_position_embeddings=4096,
    rope=RopeConfig(theta=1e8),
)
# ffn = 4 x d_model, so HF Voxtral's 4-frame stacking width (= intermediate_size) matches the real model.
TINY_ENCODER = EncoderConfig(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4)
# Devstral-2's YaRN with a small original context so short sequences cross it (and the llama-4 scaling).
TINY_DEVSTRAL2_ROPE = RopeConfig(
    theta=1e8,
    type="yarn",
    factor=48.0,
    original_max_position_embeddings=32,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
    llama4_scaling_beta=0.1,
)
AUDIO_TOKEN_ID = 24

VOXTRAL = ModelConfig(TINY_DECODER, TINY_ENCODER, AUDIO_TOKEN_ID, 4, "voxtral")
DEVSTRAL = ModelConfig(TINY_DECODER, hf_architecture="mistral")
# max positions = factor x original context, as YaRN's own bookkeeping expects.
DEVSTRAL2 = ModelConfig(
    dataclasses.replace(TINY_DECODER, rope=TINY_DEVSTRAL2_ROPE, max_position_embeddings=48 * 32),
    hf_architecture="ministral3",
)
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
DELTA_SCALE = {"devstral": 0.05, "voxtral": 0.2, "devstral2": 0.05}


def _random(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Norm weights ~ 1 + 0.1 N, biases ~ 0.1 N, matrices ~ N / sqrt(fan_in): activations stay O(1)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("bias"):
        return 0.1 * x
    if len(shape) == 1:
        return 1.0 + 0.1 * x
    if "embed_tokens" in name:
        return x
    fan_in = shape[1] * (shape[2] if len(shape) == 3 else 1)
    return x / fan_in**0.5


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: _random(name, shape, gen) for name, shape in sorted(shapes.items())}


def _zero_placeholder_rows(sd: dict[str, torch.Tensor], named: set[int]) -> None:
    """Untrained special slots: rows of ranks < 1000 without a named special are zero (embed and head)."""
    rows = torch.tensor([r for r in range(1000) if r not in named])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[name][rows] = 0.0


def decoder_family(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Base decoder and the three parents' decoders (HF Mistral names), each a seeded delta off the base."""
    base = _random_state(decoder_shapes(TINY_DECODER), seed)
    out = {"base": base}
    for k, (tag, scale) in enumerate(DELTA_SCALE.items(), start=1):
        gen = torch.Generator().manual_seed(seed + k)
        # Relative size `scale`: each delta is noise with `scale` times the base tensor's spread.
        out[tag] = {n: t + scale * t.std() * torch.randn(t.shape, generator=gen) for n, t in base.items()}
    specials = {"voxtral": set(COMMON_SPECIALS) | set(VOXTRAL_SPECIALS)}
    specials["devstral"] = specials["devstral2"] = set(COMMON_SPECIALS) | set(DEVSTRAL_SPECIALS)
    for tag, named in specials.items():
        _zero_placeholder_rows(out[tag], named)
    return out


def quantize_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-tensor FP8 e4m3 as the hub ships Devstral-2: decoder linears get `weight_scale_inv` (a scalar)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if ".layers." in name and name.endswith("proj.weight"):
            scale = t.abs().max() / FP8_MAX
            out[name] = (t / scale).to(torch.float8_e4m3fn)
            out[name.removesuffix("weight") + "weight_scale_inv"] = scale.reshape(())
        else:
            out[name] = t
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_hf(
    out: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], tekken: dict, extra_cfg: dict | None = None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", {**cfg.to_hf(), "dtype": "float32", **(extra_cfg or {})})
    write_tekken(tekken, out / "tekken.json")


def native_tensors(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors -> Mistral-native names, q/k rows back to the interleaved rope layout."""
    for name, t in hf.items():
        if name == "audio_tower.embed_positions.weight":
            continue  # recomputed by every loader; not stored in Mistral-native files
        heads = rope_heads(name, cfg)
        yield convert_name(name, cfg.hf_architecture, to_hf=False), (half_to_interleaved(t, heads) if heads else t)


def write_native(out: Path, cfg: ModelConfig, hf: dict[str, torch.Tensor], tekken: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = dict(sorted(native_tensors(cfg, hf)))
    save_file(tensors, str(out / "consolidated.safetensors"), metadata={"format": "pt"})
    _write_json(out / "params.json", params_from_config(cfg, tekken.get("audio")))
    write_tekken(tekken, out / "tekken.json")


def build_tiny_models(out: Path, seed: int = 0) -> dict[str, str]:
    """Write every tiny parent (HF + native layouts) and tokenizer under `out`; returns file -> sha256."""
    if out.exists():
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fam = decoder_family(seed)
    vox_tok, dev_tok = build_tekken(voxtral_spec(VOCAB_SIZE)), build_tekken(devstral_spec(VOCAB_SIZE))

    audio = _random_state(encoder_shapes(VOXTRAL), seed + 100)
    audio["audio_tower.embed_positions.weight"] = sinusoids(TINY_ENCODER.max_source_positions, TINY_ENCODER.hidden_size)
    voxtral = to_hf_names(fam["voxtral"], "voxtral") | audio
    devstral = fam["devstral"]
    devstral2 = quantize_fp8(fam["devstral2"])
    fp8_config = {
        "quantization_config": {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": None,
            "modules_to_not_convert": ["lm_head", "model.embed_tokens"],
        }
    }

    write_hf(tmp / "voxtral-hf", VOXTRAL, voxtral, vox_tok)
    write_hf(tmp / "devstral-hf", DEVSTRAL, devstral, dev_tok)
    write_hf(tmp / "devstral2-hf", DEVSTRAL2, devstral2, dev_tok, fp8_config)
    write_hf(tmp / "base-hf", DEVSTRAL, fam["base"], dev_tok)
    write_native(tmp / "voxtral-native", VOXTRAL, voxtral, vox_tok)
    write_native(tmp / "devstral-native", DEVSTRAL, devstral, dev_tok)

    digests = {
        str(p.relative_to(tmp)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    _write_json(tmp / "MANIFEST.json", {"seed": seed, "files": digests})
    tmp.rename(out)
    return digests
