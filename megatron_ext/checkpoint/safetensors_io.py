"""One safetensors reader (lazy, validated); writing is `safetensors_writer.py`.

Reading: `read_header` parses and checks a file's header before any tensor is touched (a JSON object
of objects, known dtypes, non-negative shapes, byte ranges contiguous from 0 with sizes matching shape x
dtype, all inside the file, `__metadata__` str -> str), so a crafted or truncated file is one
`CheckpointError` naming the file and tensor. Each tensor is then a private mapping of just its own
bytes (`map_bytes`): page-cache pages are mapped rather than copied into fresh, zero-filled memory, and
the mapping goes with the tensor, so resident memory follows the tensors alive, not the file.
`SafetensorsSource` is one checkpoint directory (single file, index + shards confined to the directory,
or an explicit file list).
"""

from __future__ import annotations

import errno
import json
import mmap
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_ext.checkpoint.atomic import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024**2  # the safetensors library's own limit

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


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives: file, dtype, shape and its byte range [start, end) in the file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(path: Path, name: str, h: object, base: int) -> Entry:
    """One header record checked for types and self-consistency (offsets relative to the data start)."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(h, dict):
        raise CheckpointError(f"{where}: header record is {type(h).__name__}, not an object")
    dtype, shape, offsets = h.get("dtype"), h.get("shape"), h.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} are not two integers")
    start, end = offsets
    if not 0 <= start <= end:
        raise CheckpointError(f"{where}: data_offsets [{start}, {end}] need 0 <= start <= end")
    numel = 1
    for s in shape:
        numel *= s
    if end - start != numel * DTYPES[dtype].itemsize:
        raise CheckpointError(
            f"{where}: data_offsets span {end - start} bytes, shape {shape} x {dtype} needs "
            f"{numel * DTYPES[dtype].itemsize}"
        )
    return Entry(path, DTYPES[dtype], tuple(shape), base + start, base + end)


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Validated tensor entries (in header order) and `__metadata__` of one safetensors file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} does not fit the file ({size} bytes)")
            text = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: __metadata__ is not an object of strings")
    base = 8 + n
    entries = {name: _entry(path, name, h, base) for name, h in header.items()}
    expected = base
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != expected:
            what = "overlaps the previous tensor" if e.start < expected else "leaves a gap before it"
            raise CheckpointError(
                f"{path}: tensor {name!r} at byte {e.start - base} {what} (ends at {expected - base})"
            )
        expected = e.end
    if expected > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, tensors need {expected})")
    return entries, meta


def read_tensor(entry: Entry, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor, or only its rows [start, stop) along the first dimension, mapped from the file."""
    shape, start, end = entry.shape, entry.start, entry.end
    if rows is not None:
        if not shape or not 0 <= rows[0] <= rows[1] <= shape[0]:
            raise CheckpointError(f"{entry.path}: rows {rows} outside a tensor of shape {list(shape)}")
        row_bytes = entry.nbytes // shape[0] if shape[0] else 0
        shape = (rows[1] - rows[0], *shape[1:])
        start, end = entry.start + rows[0] * row_bytes, entry.start + rows[1] * row_bytes
    return map_bytes(entry.path, start, end).view(entry.dtype).reshape(shape)


def confined(directory: Path, name: object, listed_in: Path, what: str = "file") -> Path:
    """`directory / name` for an existing plain file name that stays inside `directory` (for a hub-cache
    snapshot, `.../snapshots/REV`, inside its repository folder, where files link to `../../blobs/`)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise CheckpointError(f"{listed_in}: {name!r} is not a plain file name inside {directory}")
    path = directory / name
    root = directory.resolve()
    if root.parent.name == "snapshots":
        root = root.parent.parent
    if not path.resolve().is_relative_to(root):
        raise CheckpointError(f"{listed_in}: {name} links outside {directory}")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing {what} (named in {listed_in.name})")
    return path


def index_files(index: Path) -> tuple[list[Path], dict[str, str]]:
    """The shard files of a `model.safetensors.index.json` (each confined to its directory) and its weight map."""
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index}: invalid index ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
        raise CheckpointError(f"{index}: weight_map is not an object of tensor name -> file name")
    files = [confined(index.parent, f, index, "shard") for f in sorted(set(weight_map.values()), key=str)]
    return files, weight_map


class SafetensorsSource:
    """Tensors of one checkpoint directory: `model.safetensors`, an index + shards, or an explicit file list."""

    def __init__(self, directory: Path, files: Iterable[str] | None = None) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        weight_map: dict[str, str] | None = None
        if files is not None:
            self.files = [confined(self.directory, f, self.directory, "shard") for f in files]
        elif index.is_file():
            self.files, weight_map = index_files(index)
        else:
            self.files = [confined(self.directory, SINGLE_FILE, self.directory, "shard")]
        self.entries: dict[str, Entry] = {}
        for path in self.files:
            entries, _ = read_header(path)
            for name, e in entries.items():
                if name in self.entries:
                    raise CheckpointError(f"{path}: tensor {name!r} also in {self.entries[name].path.name}")
                self.entries[name] = e
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.entries))
            if absent:
                raise CheckpointError(f"{index}: tensors listed but in no shard: {', '.join(absent[:8])}")

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: tensor {name!r} not found") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entry(name).dtype

    def nbytes(self, name: str) -> int:
        return self.entry(name).nbytes

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name` (or its rows [start, stop)) mapped from its file."""
        return read_tensor(self.entry(name), rows)
