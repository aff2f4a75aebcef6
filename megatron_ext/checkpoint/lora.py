"""LoRA adapter files and their merge into full weights: W' = W + (alpha / rank) B A, under Megatron names.

An adapter directory (`lora/` in every checkpoint of a LoRA SFT run) holds `adapter_model.safetensors`, the
full (TP-gathered) A [rank, in] and B [out, rank] of every wrapped linear, named after its weight with
`lora_a` / `lora_b` for `weight` (B of SwiGLU's fc1 in the [gate; up] row order of the weight), and
`adapter_config.json`: rank, alpha, targets, the weights' sha256 and the base checkpoint's path and
fingerprint (the sha256 of its `checkpoint_meta.json`, which records every file's sha256). `merged_source`
turns the base checkpoint into a `Source` whose weights have the adapters merged in, so the ordinary
converter writes the export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.lora_layout import TARGETS, adapted_weights, adapter_shapes
from megatron_ext.checkpoint.megatron_lm import resolve
from megatron_ext.checkpoint.metadata import META_FILE, read_json_object, sha256_file
from megatron_ext.checkpoint.safetensors_io import SafetensorsSource
from megatron_ext.checkpoint.source import Source

ADAPTER_DIR = "lora"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def base_fingerprint(checkpoint: Path) -> str:
    """sha256 of the checkpoint's `checkpoint_meta.json` (it lists every file's sha256): names the exact base."""
    meta = resolve(Path(checkpoint)) / META_FILE
    if not meta.is_file():
        raise CheckpointError(f"{checkpoint}: no {META_FILE}; LoRA adapters need a megatron_ext base checkpoint")
    return sha256_file(meta)


@dataclass(frozen=True)
class AdapterConfig:
    """What `adapter_config.json` records."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    base_checkpoint: str
    base_fingerprint: str
    weights_sha256: str = ""
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "megatron_ext-lora",
            "rank": self.rank,
            "alpha": self.alpha,
            "scale": self.scale,
            "dropout": self.dropout,
            "targets": list(self.targets),
            "base_checkpoint": self.base_checkpoint,
            "base_fingerprint": self.base_fingerprint,
            "weights": {"file": ADAPTER_WEIGHTS, "sha256": self.weights_sha256},
        }


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    """Write the adapter weights and `adapter_config.json` (with the weights' sha256) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / ADAPTER_WEIGHTS
    weights.write_bytes(save({k: v.contiguous() for k, v in sorted(tensors.items())}))  # small; umask's mode
    data = AdapterConfig(**{**config.__dict__, "weights_sha256": sha256_file(weights)}).to_dict()
    (directory / ADAPTER_CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def adapter_directory(path: Path) -> Path:
    """`path` itself when it holds adapter_config.json, else its `lora/` (an SFT checkpoint's iter_* directory)."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if (path / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        return path / ADAPTER_DIR
    raise CheckpointError(f"{path}: no {ADAPTER_CONFIG} (neither a LoRA adapter directory nor a checkpoint with one)")


def read_adapter_config(directory: Path) -> AdapterConfig:
    """Parse and check `adapter_config.json`; one CheckpointError naming the file and field."""
    path = directory / ADAPTER_CONFIG
    data = read_json_object(path)
    rank, alpha, targets = data.get("rank"), data.get("alpha"), data.get("targets")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise CheckpointError(f"{path}: rank must be an integer >= 1, got {rank!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
        raise CheckpointError(f"{path}: alpha must be a number > 0, got {alpha!r}")
    if not isinstance(targets, list) or not targets or any(t not in TARGETS for t in targets):
        raise CheckpointError(f"{path}: targets must be a non-empty list from {', '.join(TARGETS)}, got {targets!r}")
    weights = data.get("weights") or {}
    return AdapterConfig(
        rank=rank,
        alpha=float(alpha),
        targets=tuple(targets),
        base_checkpoint=str(data.get("base_checkpoint", "")),
        base_fingerprint=str(data.get("base_fingerprint", "")),
        weights_sha256=str(weights.get("sha256", "")),
        dropout=float(data.get("dropout", 0.0)),
    )


class LoraMergedSource(Source):
    """The base checkpoint with the adapters merged into the weights they adapt; everything else as stored."""

    naming = "megatron"

    def __init__(self, base: Source, adapter: Path) -> None:
        self.base = base
        self.kind, self.directory, self.cfg, self.meta = base.kind, base.directory, base.cfg, base.meta
        self.files, self.tokenizer, self.config_bytes = base.files, base.tokenizer, base.config_bytes
        self.dropped, self.activation_scales = base.dropped, base.activation_scales
        self.adapter_dir = adapter_directory(adapter)
        self.adapter = read_adapter_config(self.adapter_dir)
        self._check_base()
        weights = self.adapter_dir / ADAPTER_WEIGHTS
        if not weights.is_file() or sha256_file(weights) != self.adapter.weights_sha256:
            raise CheckpointError(f"{weights}: missing, or its sha256 differs from the one in {ADAPTER_CONFIG}")
        self.tensors = SafetensorsSource(self.adapter_dir, [ADAPTER_WEIGHTS])
        expected = adapter_shapes(base.cfg, self.adapter.rank, self.adapter.targets)
        have = {n: tuple(self.tensors.shape(n)) for n in self.tensors.names()}
        for name, shape in expected.items():
            if have.get(name) != shape:
                got = "missing" if name not in have else f"shape {list(have[name])}"
                raise CheckpointError(f"{weights}: tensor {name} is {got}, expected {list(shape)}")
        extra = sorted(set(have) - set(expected))
        if extra:
            raise CheckpointError(f"{weights}: unexpected tensor {extra[0]} for targets {list(self.adapter.targets)}")
        self.adapted = set(adapted_weights(base.cfg, self.adapter.targets))
        a = self.adapter
        self.description = f"{base.description} + LoRA rank {a.rank} alpha {a.alpha:g} on {', '.join(a.targets)}"

    def _check_base(self) -> None:
        if self.base.naming != "megatron" or self.base.meta is None:
            raise CheckpointError(
                f"--lora: the adapters in {self.adapter_dir} were trained on the torch_dist checkpoint "
                f"{self.adapter.base_checkpoint}; --input {self.base.directory} is a {self.base.kind} checkpoint"
            )
        here = base_fingerprint(self.base.directory)
        if here != self.adapter.base_fingerprint:
            raise CheckpointError(
                f"--lora: the adapters in {self.adapter_dir} were trained on {self.adapter.base_checkpoint} "
                f"(fingerprint {self.adapter.base_fingerprint[:12]}); --input {self.base.directory} is another "
                f"checkpoint (fingerprint {here[:12]})"
            )

    @property
    def names(self) -> list[str]:
        return self.base.names

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor; an adapted weight as W + (alpha / rank) B A, computed in fp32, stored in W's dtype."""
        weight = self.base.get(name)
        if name not in self.adapted:
            return weight
        stem = name.removesuffix("weight")
        a, b = self.tensors.get(stem + "lora_a").float(), self.tensors.get(stem + "lora_b").float()
        return (weight.float() + self.adapter.scale * (b @ a)).to(weight.dtype)

    def close(self) -> None:
        self.base.close()
