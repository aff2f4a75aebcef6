"""Stream Megatron-Core `torch_dist` checkpoints tensor by tensor, without building the model.

A torch_dist checkpoint is a torch.distributed.checkpoint (DCP) directory: `.metadata` (pickled DCP
`Metadata`: per key the GLOBAL shape and the chunks stored), `*.distcp` data files (one `torch.save`
record per chunk), `common.pt` (non-sharded state) and `metadata.json` (backend tag). Keys are the
global ones Megatron-Core 0.16's `sharded_state_dict` produces, so the layout is TP/PP-agnostic and a
single process can write a checkpoint that Megatron loads at any TP/PP:

- a transformer-layer tensor `P.layers.{i}.REST` is stored under `P.layers.REST` with a leading layer
  axis [num_layers, ...] (one chunk per layer here; Megatron writes one per layer and TP rank);
- the fused qkv and SwiGLU fc1 ([gate; up]) are stored whole; TP ranks read contiguous row ranges
  (whole GQA groups) and the gate/up halves themselves;
- each `linear_*` module has an `_extra_state` object, a `torch.save([None])` record (Transformer
  Engine accepts None as an empty extra state): `P.layers.M._extra_state/shard_{i}_{L}` inside
  transformer layers, `M._extra_state/shard_0_1` outside them (e.g. the audio projector); GPTModel's
  `output_layer` stores none.

Names in this module's API are the full per-layer names of the naming contract
(`language_model.decoder.layers.3.mlp.linear_fc1.weight`).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.megatron_lm import load_common, resolve
from megatron_ext.checkpoint.safetensors_io import confined, map_bytes

DCP_METADATA = ".metadata"
DATA_FILE = "__0_0.distcp"
COMMON_FILE = "common.pt"
MCORE_CONFIG_FILE = "metadata.json"
MCORE_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
_LAYER = re.compile(r"^(?P<pre>.*\.layers\.)(?P<i>\d+)\.(?P<rest>.+)$")
_STACKED = re.compile(r"^.*\.layers\.(?!\d+\.).+$")
IGNORED_PREFIXES = ("optimizer.", "rng_state", "rerun_state")


def split_layer_name(name: str) -> tuple[str, int | None]:
    """Full name -> (torch_dist key, layer index or None): `a.layers.3.b` -> (`a.layers.b`, 3)."""
    m = _LAYER.match(name)
    if not m:
        return name, None
    return m["pre"] + m["rest"], int(m["i"])


def extra_state_module(key: str) -> str | None:
    """The Megatron linear module (`...linear_*`) whose `_extra_state` is stored next to weight `key`, if any."""
    if not key.endswith(".weight"):
        return None
    module = key.removesuffix(".weight")
    return module if module.rsplit(".", 1)[-1].startswith("linear_") else None


def _properties(dtype: torch.dtype) -> TensorProperties:
    return TensorProperties(dtype=dtype, requires_grad=False)


def _save_without_crc32(obj: object, f: IO[bytes]) -> None:
    """`torch.save` without the zip records' CRC32: torch.load never checks it, and computing it cost
    about twice the write itself (0.7 GB/s), CPU that the background sha256 of the sources needs."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(obj, f)
    finally:
        torch.serialization.set_crc32_options(previous)


def _fsync(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())


class TorchDistWriter:
    """Write a torch_dist checkpoint into an existing (temporary) directory, one tensor at a time.

    `write(name, tensor)` appends a `torch.save` record to the data file; `finish()` checks that every
    layer stack is complete and uniform, then writes `.metadata`, `common.pt` and `metadata.json`.
    Peak memory is one tensor: nothing is kept but shapes and file offsets.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._file = open(self.directory / DATA_FILE, "wb")
        self._tensors: dict[str, dict[int | None, tuple[tuple[int, ...], torch.dtype, _StorageInfo]]] = {}
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        key, layer = split_layer_name(name)
        entries = self._tensors.setdefault(key, {})
        if layer in entries:
            raise CheckpointError(f"torch_dist writer: tensor {name!r} written twice")
        t = tensor.detach().cpu()
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.contiguous().clone()  # torch.save stores whole storages: never save a view
        if layer is not None:
            t = t.unsqueeze(0)
        offset = self._file.tell()
        _save_without_crc32(t, self._file)
        length = self._file.tell() - offset
        self.bytes_written += length
        entries[layer] = (tuple(tensor.shape), tensor.dtype, _StorageInfo(DATA_FILE, offset, length))

    def _write_object(self, unique_key: str, obj: object) -> _StorageInfo:
        buf = io.BytesIO()
        torch.save(obj, buf)
        offset = self._file.tell()
        self._file.write(buf.getbuffer())
        return _StorageInfo(DATA_FILE, offset, self._file.tell() - offset)

    def finish(self, common: dict | None = None) -> None:
        """Write the DCP metadata, `common.pt` (`common`, e.g. Megatron-LM's iteration and args) and
        Megatron's `metadata.json`."""
        state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        storage: dict[MetadataIndex, _StorageInfo] = {}
        for key, entries in self._tensors.items():
            if None in entries:  # plain tensor: one chunk covering it
                shape, dtype, info = entries[None]
                zero = torch.Size([0] * len(shape))
                state[key] = TensorStorageMetadata(
                    _properties(dtype), torch.Size(shape), [ChunkStorageMetadata(zero, torch.Size(shape))]
                )
                storage[MetadataIndex(key, zero)] = info
                if (module := extra_state_module(key)) is not None:  # outside layers: offset (0,), shape (1,)
                    ukey = f"{module}._extra_state/shard_0_1"
                    state[ukey] = BytesStorageMetadata()
                    storage[MetadataIndex(ukey)] = self._write_object(ukey, [None])
                continue
            n = len(entries)
            missing = sorted(set(range(n)) - set(entries))
            if missing:
                raise CheckpointError(f"torch_dist writer: {key} is missing layers {missing}")
            shapes = {(s, d) for s, d, _ in entries.values()}
            if len(shapes) != 1:
                raise CheckpointError(f"torch_dist writer: {key} has different shapes/dtypes across layers: {shapes}")
            ((shape, dtype),) = shapes
            chunks = []
            for i in range(n):
                offs = torch.Size([i] + [0] * len(shape))
                chunks.append(ChunkStorageMetadata(offs, torch.Size([1, *shape])))
                storage[MetadataIndex(key, offs)] = entries[i][2]
            state[key] = TensorStorageMetadata(_properties(dtype), torch.Size([n, *shape]), chunks)
            module = extra_state_module(key)
            if module is not None:
                for i in range(n):
                    ukey = f"{module}._extra_state/shard_{i}_{n}"
                    state[ukey] = BytesStorageMetadata()
                    storage[MetadataIndex(ukey)] = self._write_object(ukey, [None])
        _fsync(self._file)
        self._file.close()
        md = Metadata(state_dict_metadata=state, storage_data=storage)
        with open(self.directory / DCP_METADATA, "wb") as f:
            pickle.dump(md, f)
            _fsync(f)
        with open(self.directory / COMMON_FILE, "wb") as f:
            torch.save(common or {}, f)
            _fsync(f)
        (self.directory / MCORE_CONFIG_FILE).write_text(json.dumps(MCORE_CONFIG))

    def close(self) -> None:
        """Close the data file without finishing (on errors)."""
        if not self._file.closed:
            self._file.close()


_DCP_CLASSES = (
    {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.planner", name)
        for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")  # Megatron's planner_data
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),  # how torch pickles a layout (looks it up by name)
        ("torch", "Size"),
        ("collections", "OrderedDict"),
        ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
    }
)
_BUILTINS = {"set", "frozenset", "tuple", "list", "dict", "slice"}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only what a DCP `.metadata` holds: its metadata classes, torch.Size, dtypes, layouts,
    memory formats and a few builtin containers. Any other global (os.system, eval, ...) is refused."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _DCP_CLASSES or (module == "builtins" and name in _BUILTINS):
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def read_dcp_metadata(path: Path) -> Metadata:
    """A torch_dist `.metadata` read with the allow-list unpickler; anything else is a CheckpointError
    naming the file (call before handing a directory to Megatron-Core or torch DCP, which unpickle it freely)."""
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read DCP metadata ({exc.strerror or exc})") from None
    except Exception as exc:  # a hostile or corrupt pickle can fail in any constructor: one line, no traceback
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(f"{path}: not DCP metadata (holds {type(md).__name__})")
    for key, sm in md.state_dict_metadata.items():
        _check_entry(path, key, sm)
    if not isinstance(md.storage_data, dict | None):
        raise CheckpointError(f"{path}: storage_data is {type(md.storage_data).__name__}, not a dict")
    for index, info in (md.storage_data or {}).items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{path}: storage_data holds {type(index).__name__} -> {type(info).__name__}")
        if not (isinstance(info.relative_path, str) and _sizes(info.offset, info.length)):
            raise CheckpointError(f"{path}: storage entry of {index.fqn!r} has a bad path, offset or length")
    for rel in {info.relative_path for info in (md.storage_data or {}).values()}:
        confined(path.parent, rel, path, "data file")
    return md


def _sizes(*values: object) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def _chunk_fits(chunk: object, size: torch.Size) -> bool:
    """A chunk of a tensor of `size`: same rank, non-negative offsets and sizes, inside the tensor."""
    if not isinstance(chunk, ChunkStorageMetadata) or not all(
        isinstance(v, tuple) for v in (chunk.offsets, chunk.sizes)
    ):
        return False
    if not len(chunk.offsets) == len(chunk.sizes) == len(size):
        return False
    spans = zip(chunk.offsets, chunk.sizes, size, strict=True)
    return _sizes(*chunk.offsets, *chunk.sizes) and all(o + n <= d for o, n, d in spans)


def _check_entry(path: Path, key: object, sm: object) -> None:
    """One state-dict entry of DCP metadata: bytes, or a tensor whose chunks have its rank and lie inside it."""
    if not isinstance(key, str) or not isinstance(sm, TensorStorageMetadata | BytesStorageMetadata):
        raise CheckpointError(f"{path}: entry {key!r} is a {type(sm).__name__}, not tensor or bytes metadata")
    if isinstance(sm, BytesStorageMetadata):
        return
    size = sm.size
    ok = (
        isinstance(size, torch.Size)
        and _sizes(*size)
        and isinstance(getattr(sm.properties, "dtype", None), torch.dtype)
    )
    if not (ok and isinstance(sm.chunks, list) and all(_chunk_fits(c, size) for c in sm.chunks)):
        raise CheckpointError(f"{path}: tensor {key!r} has an inconsistent size, dtype or chunk list")


def check_torch_dist(directory: Path) -> None:
    """Validate a torch_dist directory before Megatron-Core or torch DCP loads it (they unpickle `.metadata`
    freely): `.metadata` through the allow-list unpickler, `common.pt` with `torch.load(weights_only=True)`
    (`megatron_lm.load_common`: Megatron-LM's args namespace allowed)."""
    directory = Path(directory)
    read_dcp_metadata(directory / DCP_METADATA)
    common = directory / COMMON_FILE
    if common.is_file():
        load_common(common)


class _FileView(io.RawIOBase):
    """A seekable read-only window [offset, offset + length) of an open file, for `torch.load`."""

    def __init__(self, f: IO[bytes], offset: int, length: int) -> None:
        self._f, self._start, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def readinto(self, buf) -> int:  # type: ignore[override]
        n = min(len(buf), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buf)[:n])
        self._pos += got
        return got


def _mapped_record(path: Path, f: IO[bytes], info: _StorageInfo) -> torch.Tensor | None:
    """The tensor of one `torch.save` record mapped from the file instead of read into fresh memory, or
    None when the record is not one uncompressed little-endian storage (then `torch.load` reads it).
    Shape, strides and offset come from the record's pickle loaded onto the meta device (no data read)."""
    meta = torch.load(_FileView(f, info.offset, info.length), map_location="meta", weights_only=True)
    if not isinstance(meta, torch.Tensor):
        return None
    with zipfile.ZipFile(_FileView(f, info.offset, info.length)) as z:
        entries = z.infolist()
    data = [e for e in entries if "/data/" in e.filename]
    if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED:
        return None
    for e in entries:
        if e.filename.endswith("/byteorder"):
            f.seek(_entry_start(f, info.offset, e))
            if f.read(e.file_size) != b"little":
                return None
    start = _entry_start(f, info.offset, data[0])
    storage = map_bytes(path, start, start + data[0].file_size).view(meta.dtype)
    return storage.as_strided(meta.shape, meta.stride(), meta.storage_offset())


def _entry_start(f: IO[bytes], base: int, entry: zipfile.ZipInfo) -> int:
    """File offset of a stored zip entry's bytes (its local header's name and extra lengths decide it;
    read directly: our records carry no CRC32 for zipfile to check)."""
    f.seek(base + entry.header_offset)
    header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for {entry.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return base + entry.header_offset + 30 + name_len + extra_len


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one full (per-layer) tensor in a torch_dist checkpoint."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _overlap(chunk: ChunkStorageMetadata, lo: list[int], hi: list[int]) -> list[tuple[int, int]] | None:
    """Per-dimension [start, end) where `chunk` meets the box [lo, hi), or None when they are disjoint."""
    spans = [(max(o, a), min(o + n, b)) for o, n, a, b in zip(chunk.offsets, chunk.sizes, lo, hi, strict=True)]
    return spans if all(a < b for a, b in spans) else None


class TorchDistReader:
    """Read full per-layer tensors from a torch_dist checkpoint written by us or by Megatron at any TP/PP.

    Only the chunks overlapping the requested layer are read, one record at a time, each mapped from the
    file (`_mapped_record`; `torch.load(weights_only=True)` for any other record), so memory stays at
    about one tensor plus one chunk.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = resolve(Path(directory))
        md_path = self.directory / DCP_METADATA
        if not md_path.is_file():
            raise CheckpointError(f"{self.directory}: no {DCP_METADATA} (not a torch_dist checkpoint)")
        self._md = read_dcp_metadata(md_path)
        self._files: dict[str, IO[bytes]] = {}
        self._names: dict[str, tuple[str, int | None]] = {}
        for key, sm in self._md.state_dict_metadata.items():
            if not isinstance(sm, TensorStorageMetadata) or key.startswith(IGNORED_PREFIXES):
                continue
            if _STACKED.match(key):
                pre, rest = key.split(".layers.", 1)
                for i in range(sm.size[0]):
                    self._names[f"{pre}.layers.{i}.{rest}"] = (key, i)
            else:
                self._names[key] = (key, None)
        self._by_offset = {
            (k.fqn, tuple(k.offset)): v for k, v in (self._md.storage_data or {}).items() if k.offset is not None
        }

    def names(self) -> list[str]:
        """Full per-layer tensor names (optimizer states and objects excluded)."""
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def info(self, name: str) -> TensorInfo:
        key, layer = self._lookup(name)
        sm = self._md.state_dict_metadata[key]
        shape = tuple(sm.size[1:] if layer is not None else sm.size)
        return TensorInfo(shape, sm.properties.dtype)

    def _lookup(self, name: str) -> tuple[str, int | None]:
        try:
            return self._names[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: no tensor {name!r} in the torch_dist checkpoint") from None

    def _file(self, rel: str) -> IO[bytes]:
        if rel not in self._files:
            self._files[rel] = open(confined(self.directory, rel, self.directory / DCP_METADATA, "data file"), "rb")
        return self._files[rel]

    def _load_chunk(self, key: str, offsets: tuple[int, ...]) -> torch.Tensor:
        info = self._by_offset.get((key, offsets))
        if info is None:
            raise CheckpointError(f"{self.directory}: no storage entry for {key} at {offsets}")
        f = self._file(info.relative_path)
        size = os.fstat(f.fileno()).st_size
        if info.offset < 0 or info.length < 0 or info.offset + info.length > size:
            raise CheckpointError(
                f"{f.name}: truncated or bad record ({size} bytes, {key} needs "
                f"{info.offset}..{info.offset + info.length})"
            )
        path = Path(f.name)
        try:
            mapped = _mapped_record(path, f, info)
            if mapped is not None:
                return mapped
            return torch.load(_FileView(f, info.offset, info.length), map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{path}: corrupt record for {key} ({exc})") from None

    def get(self, name: str) -> torch.Tensor:
        """The full tensor `name` (one layer of a stacked key), assembled from the chunks that cover it."""
        key, layer = self._lookup(name)
        sm: TensorStorageMetadata = self._md.state_dict_metadata[key]  # type: ignore[assignment]
        lo = [0] * len(sm.size)
        hi = list(sm.size)
        if layer is not None:
            lo[0], hi[0] = layer, layer + 1
        parts = [c for c in sm.chunks if _overlap(c, lo, hi) is not None]
        box = [b - a for a, b in zip(lo, hi, strict=True)]
        if len(parts) == 1 and list(parts[0].offsets) == lo and list(parts[0].sizes) == box:
            out = self._load_chunk(key, tuple(parts[0].offsets))
        else:
            out = torch.empty(box, dtype=sm.properties.dtype)
            covered = 0
            for c in parts:
                src, dst = self._load_chunk(key, tuple(c.offsets)), out
                for d, (a, b) in enumerate(_overlap(c, lo, hi)):  # type: ignore[arg-type]
                    src, dst = src.narrow(d, a - c.offsets[d], b - a), dst.narrow(d, a - lo[d], b - a)
                dst.copy_(src)
                covered += dst.numel()
            if covered != out.numel():
                raise CheckpointError(f"{self.directory}: chunks of {key} do not cover layer {layer}")
        return out[0] if layer is not None else out

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def is_torch_dist(directory: Path) -> bool:
    """True when `directory` looks like a torch_dist checkpoint (DCP metadata + Megatron backend tag)."""
    d = Path(directory)
    if not (d / DCP_METADATA).is_file():
        return False
    try:
        cfg = json.loads((d / MCORE_CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return cfg.get("sharded_backend") == "torch_dist"
