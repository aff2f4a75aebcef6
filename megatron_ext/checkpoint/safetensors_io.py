"""Lazy safetensors reading (single file or sharded with an index) and streaming safetensors writing.

Reading: headers are parsed up front (names, dtypes, shapes, byte ranges checked against the file size,
so a truncated shard fails before any work); each tensor is a private mapping of just its own bytes
(`map_bytes`): page-cache pages are mapped rather than copied into fresh, zero-filled memory, and the
mapping goes with the tensor, so resident memory follows the tensors alive, not the file.
Writing: a header area is reserved, tensors are appended as raw bytes as they arrive, and the header is
written last (padded with spaces, which the format allows), so no file is ever held in memory.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
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


def _header_entry(t: torch.Tensor, start: int) -> dict:
    return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [start, start + t.nbytes]}


class SafetensorsWriter:
    """Append tensors to `model-XXXXX.safetensors` shards (or one named file) without holding them.

    `names` (all tensor names that may be written) sizes the reserved header area. A new shard starts when
    the current one would exceed `max_shard_bytes`. `finish()` writes headers and, for several shards,
    `model.safetensors.index.json`; with one shard the file is `single_name`.
    """

    def __init__(
        self,
        directory: Path,
        names: Iterable[str],
        max_shard_bytes: int = 5 << 30,
        single_name: str = SINGLE_FILE,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.single_name = single_name
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata or {"format": "pt"}
        # Upper bound of the JSON header: name + dtype/shape/offsets (<= 120 chars) per tensor, + metadata.
        self._reserve = sum(len(n) + 120 for n in names) + len(json.dumps(self.metadata)) + 64
        self._reserve += -self._reserve % 8
        self._shards: list[tuple[Path, dict[str, dict]]] = []
        self._f = None
        self._pos = 0
        self.bytes_written = 0

    def _open_shard(self) -> None:
        self._close_shard()
        path = self.directory / f".shard-{len(self._shards):05d}.tmp"
        self._f = open(path, "wb")
        self._f.write(b"\0" * (8 + self._reserve))
        self._shards.append((path, {}))
        self._pos = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{name}: dtype {tensor.dtype} has no safetensors code")
        t = tensor.detach().cpu().contiguous()
        if self._f is None or (self._pos and self._pos + t.nbytes > self.max_shard_bytes):
            self._open_shard()
        header = self._shards[-1][1]
        if any(name in h for _, h in self._shards):
            raise CheckpointError(f"safetensors writer: tensor {name!r} written twice")
        header[name] = _header_entry(t, self._pos)
        if t.nbytes:
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[union-attr]
        self._pos += t.nbytes
        self.bytes_written += t.nbytes

    def _close_shard(self) -> None:
        if self._f is None:
            return
        path, header = self._shards[-1]
        text = json.dumps({"__metadata__": self.metadata, **header}, separators=(",", ":")).encode()
        if len(text) > self._reserve:
            raise CheckpointError(f"{path}: safetensors header larger than reserved ({len(text)} > {self._reserve})")
        self._f.seek(0)
        self._f.write(struct.pack("<Q", self._reserve) + text + b" " * (self._reserve - len(text)))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None

    def finish(self) -> list[str]:
        """Close the last shard, give shards their final names, write the index if sharded."""
        if self._f is None and not self._shards:
            self._open_shard()
        self._close_shard()
        n = len(self._shards)
        if n == 1:
            names = [self.single_name]
        else:
            names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        weight_map: dict[str, str] = {}
        total = 0
        for (tmp, header), final in zip(self._shards, names, strict=True):
            tmp.rename(self.directory / final)
            for tensor in header:
                weight_map[tensor] = final
                total += header[tensor]["data_offsets"][1] - header[tensor]["data_offsets"][0]
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
