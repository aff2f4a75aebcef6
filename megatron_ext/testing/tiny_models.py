"""Tiny, seeded stand-ins for the parent models (Voxtral, Devstral, Devstral-2) and their tokenizers.

A shared random base decoder plus a small Devstral delta and a larger, different Voxtral delta, so
merges are meaningful. Shapes keep Mistral Small 3's ratios (GQA 8q/2kv, heads*head_dim != hidden,
SwiGLU, untied head, theta 1e8). Every tensor is random, norms included, so a mapping error shows in
the logits. Everything is written byte-identically for a given seed. Devstral Small 2, Voxtral Small and
Devstral Small 2507 also come in the layouts they are published in (`published_layouts.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_ext.audio.positions import sinusoids
from megatron_ext.checkpoint.mistral_native import params_from_config
from megatron_ext.checkpoint.shapes import decoder_shapes, encoder_shapes, to_hf_names
from megatron_ext.config import DecoderConfig, EncoderConfig, ModelConfig, RopeConfig
from megatron_ext.testing.published_layouts import (
    devstral2_params,
    mistral3_config,
    native_names,
    native_vision_name,
    plain_params,
    quantize,
    renamed,
    vision_shapes,
    voxtral_params,
    write_json,
    write_shards,
)
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
# Devstral Small 2507: Mistral Small 3.1's decoder with rope theta 1e9, as its params.json says.
DEVSTRAL2507 = ModelConfig(
    dataclasses.replace(TINY_DECODER, rope=RopeConfig(theta=1e9), max_position_embeddings=131072),
    hf_architecture="mistral",
)
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


def random_hf_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random tensors under HF Voxtral names for any tiny config (decoder, plus encoder and projector)."""
    decoder = to_hf_names(_random_state(decoder_shapes(cfg.decoder), seed), "voxtral")
    return decoder | (_random_state(encoder_shapes(cfg), seed + 100) if cfg.encoder is not None else {})


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


def write_hf(out: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], tekken: dict, shards: int = 0) -> None:
    """HF layout: `model.safetensors`, or `shards` files with an index as the hub ships them."""
    out.mkdir(parents=True, exist_ok=True)
    if shards:
        write_shards(out, tensors, "model", shards, index=True)
    else:
        save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", {**cfg.to_hf(), "dtype": "float32"})
    write_tekken(tekken, out / "tekken.json")


def write_native(out: Path, cfg: ModelConfig, hf: dict[str, torch.Tensor], tekken: dict, params: dict) -> None:
    """Mistral-native layout: one `consolidated.safetensors` + `params.json` (as given) + `tekken.json`."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = dict(sorted(native_names(cfg, hf).items()))
    save_file(tensors, str(out / "consolidated.safetensors"), metadata={"format": "pt"})
    write_json(out / "params.json", params, sort=False)  # key order as published
    write_tekken(tekken, out / "tekken.json")


def write_devstral2(out: Path, decoder: dict[str, torch.Tensor], tekken: dict, seed: int) -> None:
    """Devstral Small 2 as published: HF Mistral3 FP8 (sharded) and Mistral-native (split consolidated)."""
    gen = torch.Generator().manual_seed(seed + 300)
    fp8 = quantize(decoder, gen)
    vision = _random_state(vision_shapes(DEVSTRAL2.decoder.hidden_size), seed + 200)
    legacy = {"language_model." + n: t for n, t in fp8.items()}  # the names transformers saves Mistral3 under
    hf = out / "devstral2-hf"
    write_shards(hf, legacy | vision, "model", 2, index=True)
    write_json(hf / "config.json", mistral3_config(DEVSTRAL2))
    write_tekken(tekken, hf / "tekken.json")
    native = out / "devstral2-native"
    tensors = native_names(DEVSTRAL2, fp8) | renamed(vision, native_vision_name)
    write_shards(native, tensors, "consolidated", 2, index=False)
    write_json(native / "params.json", devstral2_params(DEVSTRAL2), sort=False)
    write_tekken(tekken, native / "tekken.json")


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

    write_hf(tmp / "voxtral-hf", VOXTRAL, voxtral, vox_tok)
    write_hf(tmp / "voxtral-hf-sharded", VOXTRAL, voxtral, vox_tok, shards=2)
    write_hf(tmp / "devstral-hf", DEVSTRAL, devstral, dev_tok)
    write_hf(tmp / "devstral2507-hf", DEVSTRAL2507, devstral, dev_tok, shards=2)
    write_hf(tmp / "base-hf", DEVSTRAL, fam["base"], dev_tok)
    write_devstral2(tmp, fam["devstral2"], dev_tok, seed)
    write_native(tmp / "voxtral-native", VOXTRAL, voxtral, vox_tok, voxtral_params(VOXTRAL))
    write_native(tmp / "devstral-native", DEVSTRAL, devstral, dev_tok, params_from_config(DEVSTRAL))
    write_native(tmp / "devstral2507-native", DEVSTRAL2507, devstral, dev_tok, plain_params(DEVSTRAL2507))

    digests = {
        str(p.relative_to(tmp)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    write_json(tmp / "MANIFEST.json", {"seed": seed, "files": digests})
    tmp.rename(out)
    return digests
