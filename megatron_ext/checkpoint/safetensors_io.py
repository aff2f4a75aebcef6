"""Lazy safetensors reading (single file or sharded with an index); writing is `safetensors_writer.py`.

Reading: headers are parsed up front (names, dtypes, shapes, byte ranges checked against the file size,
so a truncated shard fails before any work); each tensor is a private mapping of just its own bytes
(`map_bytes`): page-cache pages are mapped rather than copied into fresh, zero-filled memory, and the
mapping goes with the tensor, so resident memory follows the tensors alive, not the file.
"""

from __future__ import annotations

import errno
import json
import mmap
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from megatron_ext.checkpoint.atomic import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14


def map_bytes(path: Path, start: int, end: int) -> torch.Tensor:
    """Bytes [start, end) of a file as a uint8 tensor over a copy-on-write mapping, prefaulted for reading.

    Nothing is copied until written (a write copies only the touched page; the file never changes), and
    the mapping is released when the last tensor viewing it is freed."""
    if end <= start:
        return torch.empty(0, dtype=torch.uint8)
    lo = start - start % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), end - lo, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=lo)
    try:
        m.madvise(_MADV_POPULATE_READ)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: kernel without MADV_POPULATE_READ (pages fault in on use)
            m.close()
            raise CheckpointError(f"{path}: cannot read bytes {start}..{end} ({exc.strerror}; truncated?)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns about non-writable buffers; this one is writable
        return torch.frombuffer(m, dtype=torch.uint8, count=end - start, offset=start - lo)


def read_header(path: Path) -> dict[str, dict]:
    """Parse a safetensors header and check that every tensor's bytes lie inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, tensors need {8 + n + end})")
    return header


class SafetensorsSource:
    """Tensors of one checkpoint directory: `model.safetensors`, an index + shards, or an explicit file list."""

    def __init__(self, directory: Path, files: Iterable[str] | None = None) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if files is None:
            if index.is_file():
                try:
                    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as exc:
                    raise CheckpointError(f"{index}: invalid index ({exc})") from None
                files = sorted(set(weight_map.values()))
            else:
                files = [SINGLE_FILE]
        self.files = [self.directory / f for f in files]
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[str, tuple[int, ...], int]] = {}  # dtype code, shape, absolute offset
        for path in self.files:
            if not path.is_file():
                raise CheckpointError(f"{path}: missing shard")
            header = read_header(path)
            with open(path, "rb") as f:
                base = 8 + struct.unpack("<Q", f.read(8))[0]
            for name, h in header.items():
                if name in self._where:
                    raise CheckpointError(f"{path}: tensor {name!r} also in {self._where[name].name}")
                if h["dtype"] not in DTYPES:
                    raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {h['dtype']}")
                self._where[name] = path
                self._meta[name] = (h["dtype"], tuple(h["shape"]), base + h["data_offsets"][0])
        if index.is_file() and files is not None:
            listed = json.loads(index.read_text()).get("weight_map", {})
            absent = sorted(set(listed) - set(self._where))
            if absent:
                raise CheckpointError(f"{index}: tensors listed but in no shard: {', '.join(absent[:8])}")

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._meta[name][0]]

    def nbytes(self, name: str) -> int:
        n = self.dtype(name).itemsize
        for s in self.shape(name):
            n *= s
        return n

    def get(self, name: str) -> torch.Tensor:
        path = self._where.get(name)
        if path is None:
            raise CheckpointError(f"{self.directory}: tensor {name!r} not found")
        code, shape, offset = self._meta[name]
        return map_bytes(path, offset, offset + self.nbytes(name)).view(DTYPES[code]).reshape(shape)
