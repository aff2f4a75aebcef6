"""Streaming safetensors I/O with flat memory: read one tensor (or a row range of it) as its own
mapping (`checkpoint.safetensors_io.map_bytes`: released with the tensor, so resident memory does not
grow with the file), write shards whose headers are planned up front (so a finished shard is final and
an interrupted merge resumes shard by shard; `checkpoint/safetensors_io.py` writes headers last, which
suits conversion but not these two needs).

Format (public spec): 8-byte little-endian header length, JSON header {name: {dtype, shape,
data_offsets}, "__metadata__": {str: str}}, then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_ext.checkpoint.safetensors_io import DTYPE_NAMES, DTYPES, map_bytes
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


def header_bytes(
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str], align: int = 8
) -> bytes:
    """The length-prefixed JSON header for tensors written back to back in the given order, padded with
    spaces so the tensor data starts at a multiple of `align` (8 or more)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in tensors:
        n = _nbytes(dtype, shape)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % align)
    return struct.pack("<Q", len(raw)) + raw


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (contiguous, CPU) without a copy when possible."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def plan_shards(
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split tensors (in order) into shards of at most max_bytes (a larger tensor gets its own shard)."""
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        n = _nbytes(t[1], t[2])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def shard_names(count: int, stem: str = "model") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
