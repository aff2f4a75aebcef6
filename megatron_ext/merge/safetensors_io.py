"""Streaming safetensors reading with flat memory: read one tensor (or a row range of it) as its own
mapping (`checkpoint.safetensors_io.map_bytes`: released with the tensor, so resident memory does not
grow with the file). Writing is `checkpoint/safetensors_writer.py`.

Format (public spec): 8-byte little-endian header length, JSON header {name: {dtype, shape,
data_offsets}, "__metadata__": {str: str}}, then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_ext.checkpoint.safetensors_io import DTYPES, map_bytes
from megatron_ext.errors import ProjectError


class SafetensorsError(ProjectError, ValueError):
    """A safetensors file is unreadable or inconsistent."""


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives: file, dtype, shape, byte range."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Tensor entries and `__metadata__` of one safetensors file."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        size = path.stat().st_size
    except (OSError, struct.error, ValueError) as exc:
        raise SafetensorsError(f"{path}: not a readable safetensors file ({exc})") from None
    base = 8 + n
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, h in header.items():
        if h["dtype"] not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {h['dtype']}")
        start, end = (base + o for o in h["data_offsets"])
        if end > size:
            raise SafetensorsError(f"{path}: tensor {name} extends past the end of the file (truncated?)")
        out[name] = Entry(path, DTYPES[h["dtype"]], tuple(h["shape"]), start, end)
    return out, meta


def read_tensor(entry: Entry, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor, or only its rows [start, stop) along the first dimension, mapped from the file."""
    shape, start, end = entry.shape, entry.start, entry.end
    if rows is not None:
        row_bytes = entry.nbytes // shape[0] if shape and shape[0] else 0
        shape = (rows[1] - rows[0], *shape[1:])
        start, end = entry.start + rows[0] * row_bytes, entry.start + rows[1] * row_bytes
    return map_bytes(entry.path, start, end).view(entry.dtype).reshape(shape)
