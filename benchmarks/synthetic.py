"""Synthetic parent pairs of any size (benchmarks, fault tests), generated and written block by block.

Like the tiny models, both parents are a shared random base plus a per-parent delta (Devstral small,
Voxtral larger), so merges have realistic geometry; unlike them, nothing is held whole in memory:
every tensor is produced in blocks of rows from generators seeded by (seed, tensor, block), and the
safetensors header is planned up front so data streams straight to disk.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from megatron_ext.checkpoint.safetensors_io import read_header, read_tensor
from megatron_ext.checkpoint.safetensors_writer import ShardFile, tensor_bytes
from megatron_ext.checkpoint.shapes import decoder_shapes, encoder_shapes, to_hf_names
from megatron_ext.config import DecoderConfig, EncoderConfig, ModelConfig
from megatron_ext.tokenizer.tekken_builder import build_tekken, devstral_spec, voxtral_spec, write_tekken

BLOCK = 4 * 1024 * 1024
DELTA = {"devstral": 0.05, "voxtral": 0.2}


def _gen(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


class Noise:
    """Standard-normal blocks keyed by (seed, tensor, block): exact draws (`fast=False`), or windows of one
    shared 16 Mi-value pool at keyed offsets (`fast=True`, memory-bound: multi-GB benchmark parents in
    seconds; values then repeat across tensors, which only matters for statistics, not for speed)."""

    POOL = 16 * 1024 * 1024

    def __init__(self, seed: int, fast: bool):
        self.seed, self.fast = seed, fast
        self.pool = torch.randn(self.POOL + BLOCK, generator=_gen(seed, "pool")) if fast else None

    def __call__(self, n: int, *key: object) -> torch.Tensor:
        if self.pool is None:
            return torch.randn(n, generator=_gen(self.seed, *key))
        start = zlib.crc32(repr(key).encode()) % self.POOL
        return self.pool[start : start + n]


def _blocks(name: str, shape: tuple[int, ...], parent: str, noise: Noise, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Rows of base + delta for one tensor, ~BLOCK elements at a time."""
    rows, width = (shape[0], int(torch.Size(shape[1:]).numel())) if len(shape) > 1 else (1, shape[0])
    scale = 1.0 if len(shape) == 1 or "embed" in name else width**-0.5
    step = max(1, BLOCK // width)
    for b, r in enumerate(range(0, rows, step)):
        n = (min(rows, r + step) - r) * width
        base = noise(n, name, b) * scale
        if len(shape) == 1:
            base += 1.0
        yield (base + noise(n, parent, name, b) * (DELTA.get(parent, 0.0) * scale)).to(dtype)


def write_streaming(
    path: Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    blocks: Callable[[str, tuple[int, ...], torch.dtype], Iterator[torch.Tensor]],
) -> None:
    """Write one safetensors file whose tensors arrive as blocks (header planned from `specs`)."""
    tmp = path.with_name(path.name + ".tmp")
    with ShardFile(tmp, specs) as f:
        for name, dtype, shape in specs:
            for block in blocks(name, shape, dtype):
                f.write(tensor_bytes(block))
    tmp.replace(path)


def write_parent(out: Path, cfg: ModelConfig, parent: str, noise: Noise, dtype: torch.dtype) -> Path:
    """One synthetic HF checkpoint directory (`parent` is devstral or voxtral; layout from cfg)."""
    out.mkdir(parents=True, exist_ok=True)
    shapes = to_hf_names(decoder_shapes(cfg.decoder), cfg.hf_architecture)  # type: ignore[arg-type]
    if cfg.encoder is not None:
        shapes = {**encoder_shapes(cfg), **shapes}
    specs = [(n, dtype, tuple(s)) for n, s in shapes.items()]

    def blocks(name: str, shape: tuple[int, ...], dt: torch.dtype) -> Iterator[torch.Tensor]:
        # The decoder is shared between parents up to the delta: generate it under its layout-free name.
        key = name.removeprefix("language_model.").removeprefix("model.").replace("lm_head", "head")
        return _blocks(key, shape, parent, noise, dt)

    write_streaming(out / "model.safetensors", specs, blocks)
    hf = {**cfg.to_hf(), "dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    spec = voxtral_spec if cfg.has_audio else devstral_spec
    write_tekken(build_tekken(spec(cfg.decoder.vocab_size)), out / "tekken.json")
    return out


def write_pair(
    out: Path,
    decoder: DecoderConfig,
    encoder: EncoderConfig,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    fast: bool = False,
) -> tuple[Path, Path]:
    """Devstral-like (MistralForCausalLM) and Voxtral-like (with audio stack) parents under `out`."""
    noise = Noise(seed, fast)
    dev = write_parent(out / "devstral", ModelConfig(decoder, hf_architecture="mistral"), "devstral", noise, dtype)
    vox_cfg = ModelConfig(decoder, encoder, audio_token_id=24, projector_stack=4, hf_architecture="voxtral")
    vox = write_parent(out / "voxtral", vox_cfg, "voxtral", noise, dtype)
    return dev, vox


def write_mistral_view(voxtral: Path, devstral: Path, out: Path) -> Path:
    """Voxtral's decoder alone as a MistralForCausalLM checkpoint (for peers that only know that layout)."""
    out.mkdir(parents=True, exist_ok=True)
    entries, _ = read_header(voxtral / "model.safetensors")
    rename = {
        n: (
            "lm_head.weight"
            if n == "language_model.lm_head.weight"
            else "model." + n.removeprefix("language_model.model.")
        )
        for n in entries
        if n.startswith("language_model.")
    }
    specs = [(rename[n], entries[n].dtype, entries[n].shape) for n in rename]
    by_new = {v: k for k, v in rename.items()}

    def blocks(name: str, shape: tuple[int, ...], dt: torch.dtype) -> Iterator[torch.Tensor]:
        yield read_tensor(entries[by_new[name]])

    write_streaming(out / "model.safetensors", specs, blocks)
    (out / "config.json").write_text((devstral / "config.json").read_text())
    return out
