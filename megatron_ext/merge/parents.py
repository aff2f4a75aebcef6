"""Merge inputs: a parent checkpoint opened for tensor-by-tensor reading (HF safetensors directory).

A parent knows its `ModelConfig`, tokenizer file, tensor table (name -> dtype, shape) and reads one
tensor at a time; NaN/Inf in a tensor is an error naming the checkpoint and the tensor.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import torch

from megatron_ext.config import ConfigError, ModelConfig
from megatron_ext.merge.safetensors_io import Entry, SafetensorsError, read_header, read_tensor

FINITE_CHUNK = 16 * 1024 * 1024


class ParentError(ValueError):
    """A parent checkpoint is missing, malformed, or holds invalid values."""


class HFParent:
    """An HF checkpoint directory: config.json, tekken.json, model*.safetensors (index optional)."""

    format = "hf"

    def __init__(self, path: Path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise ParentError(f"{self.path}: no config.json (expected an HF checkpoint directory)")
        self.config_bytes = cfg_path.read_bytes()
        try:
            self.hf_config = json.loads(self.config_bytes)
            self.config = ModelConfig.from_hf(self.hf_config)
        except (ValueError, KeyError, ConfigError) as exc:
            raise ParentError(f"{cfg_path}: {exc}") from None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ParentError(f"{self.path}: no *.safetensors files")
        self.entries: dict[str, Entry] = {}
        for f in files:
            try:
                entries, _ = read_header(f)
            except SafetensorsError as exc:
                raise ParentError(str(exc)) from None
            self.entries.update(entries)
        fp8 = [n for n, e in self.entries.items() if e.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
        if fp8:
            raise ParentError(
                f"{self.path}: FP8 tensors (e.g. {fp8[0]}): dequantise first (tools/convert.py), merges need bf16/fp32"
            )
        self.tokenizer_path = self.path / "tekken.json"
        if not self.tokenizer_path.is_file():
            raise ParentError(f"{self.path}: no tekken.json")
        self.crc: dict[str, int] = {}

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def nbytes(self, name: str) -> int:
        return self.entries[name].nbytes

    def read(self, name: str) -> torch.Tensor:
        """One tensor, checked finite; its CRC32 is recorded for the parent's content hash."""
        if name not in self.entries:
            raise ParentError(f"{self.path}: missing tensor {name}")
        t = read_tensor(self.entries[name])
        self.crc[name] = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())
        check_finite(t, f"{self.path}: tensor {name}")
        return t

    def content_hash(self) -> str:
        """sha256 over config, tokenizer and the tensor table with each tensor's CRC32 (read tensors only)."""
        h = hashlib.sha256(self.config_bytes + self.tokenizer_path.read_bytes())
        for name in sorted(self.entries):
            e = self.entries[name]
            h.update(f"{name}|{e.dtype}|{list(e.shape)}|{self.crc.get(name, 'unread')}\n".encode())
        return h.hexdigest()


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise naming `what` when a floating tensor holds NaN or Inf (checked in chunks: bounded memory)."""
    if not t.is_floating_point():
        return
    flat = t.reshape(-1)
    for s in range(0, flat.numel(), FINITE_CHUNK):
        if not torch.isfinite(flat[s : s + FINITE_CHUNK]).all():
            raise ParentError(f"{what} contains NaN or Inf")


def open_parent(path: Path) -> HFParent:
    """Open a parent checkpoint directory (HF safetensors; torch_dist when the conversion module is present)."""
    path = Path(path)
    if not path.is_dir():
        raise ParentError(f"{path}: not a directory")
    if (path / "config.json").is_file():
        return HFParent(path)
    raise ParentError(f"{path}: neither an HF checkpoint (config.json) nor a supported Megatron checkpoint")
