"""The one safetensors writer: files whose header is planned up front or written last, shards, the index.

Format (public spec): 8-byte little-endian header length, JSON header {"__metadata__": {str: str}, name:
{dtype, shape, data_offsets}}, then the raw little-endian tensor bytes back to back.

A `ShardFile` is written front to back into a buffered file or an O_DIRECT sink (`direct_io.DirectWriter`)
and fsynced when closed. Its header is either
- planned: every tensor's name, dtype and shape are known before the first byte (the merge), so the header
  goes first, padded with spaces so the data starts on an `align` boundary (O_DIRECT copies nothing), and
  a closed shard is final: an interrupted merge resumes shard by shard; or
- written last: dtypes and shapes arrive with the tensors (conversion), so an area sized from the names
  is reserved and filled in on close (padded with spaces to exactly that size, which the format allows).
`PlannedShards` splits a planned checkpoint into resumable shards (the merge); `SafetensorsWriter` streams
a checkpoint whose tensors arrive one by one (conversion, benchmarks) through header-last shards.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.direct_io import DirectWriter
from megatron_ext.checkpoint.safetensors_io import DTYPE_NAMES, INDEX_FILE

TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]  # name, dtype, shape
DEFAULT_METADATA = {"format": "pt"}


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of this dtype and shape."""
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def header_bytes(tensors: list[TensorSpec], metadata: dict[str, str], align: int = 8, size: int | None = None) -> bytes:
    """The length-prefixed JSON header for tensors written back to back in the given order, padded with spaces
    so the data starts at a multiple of `align` (8 or more), or to exactly `size` JSON bytes (a reserved area)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in tensors:
        n = nbytes(dtype, shape)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    if size is None:
        raw += b" " * (-(8 + len(raw)) % align)
    elif len(raw) > size:
        raise CheckpointError(f"safetensors header larger than reserved ({len(raw)} > {size} bytes)")
    else:
        raw += b" " * (size - len(raw))
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (contiguous, CPU) without a copy when possible."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def plan_shards(tensors: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors (in order) into shards of at most max_bytes (a larger tensor gets its own shard)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in tensors:
        n = nbytes(t[1], t[2])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def shard_names(count: int, stem: str = "model", single: str | None = None) -> list[str]:
    """HF shard file names: `single` (default `STEM.safetensors`) for one, `STEM-0000K-of-0000N.safetensors`."""
    if count == 1:
        return [single or f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(
    path: Path, weight_map: dict[str, str], total_size: int | None = None, metadata: dict[str, Any] | None = None
) -> None:
    """An HF `model.safetensors.index.json` (names sorted; `metadata.total_size` when given, plus `metadata`)."""
    meta = ({} if total_size is None else {"total_size": total_size}) | (metadata or {})
    index = {"metadata": meta, "weight_map": weight_map}
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


class ShardFile:
    """One safetensors file written front to back (see the module docstring); a context manager that closes
    (header written if last, data fsynced) on a clean exit and only releases the file on an error.

    Planned: pass `tensors` and feed their bytes in order through `write` (any split, e.g. row blocks).
    Header last: pass `reserve` (JSON bytes to set aside) and add whole tensors with `add`. `direct` sends
    the data through O_DIRECT (planned headers only: the sink cannot seek back)."""

    def __init__(
        self,
        path: Path,
        tensors: list[TensorSpec] | None = None,
        reserve: int = 0,
        metadata: dict[str, str] | None = None,
        align: int = 8,
        direct: bool = False,
    ) -> None:
        if (tensors is None) == (reserve == 0) or (direct and tensors is None):
            raise ValueError("ShardFile: give the planned `tensors` or a `reserve` for a header written last")
        self.path = Path(path)
        self.metadata = DEFAULT_METADATA if metadata is None else metadata
        self.tensors: list[TensorSpec] = [] if tensors is None else list(tensors)
        self.reserve = reserve
        self._sink: Any = DirectWriter(self.path) if direct else open(self.path, "wb")
        head = header_bytes(self.tensors, self.metadata, align) if tensors is not None else b"\0" * (8 + reserve)
        self._sink.write(head)
        self._data_start = len(head)
        self.data_bytes = 0  # tensor bytes written so far

    def write(self, data: Any) -> int:
        """Append raw tensor bytes (any contiguous buffer); returns their length."""
        n = self._sink.write(data)
        self.data_bytes += n
        return n

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append a whole tensor and its header entry (header-last files)."""
        if tensor.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{name}: dtype {tensor.dtype} has no safetensors code")
        t = tensor.detach().cpu().contiguous()
        self.tensors.append((name, t.dtype, tuple(t.shape)))
        self.write(tensor_bytes(t))

    def close(self) -> None:
        """Finish the file: header (if written last), then fsync, so a closed shard is on disk."""
        planned = sum(nbytes(d, s) for _, d, s in self.tensors)
        if self.data_bytes != planned:
            self.abandon()
            raise CheckpointError(f"{self.path}: {self.data_bytes} tensor bytes written, header says {planned}")
        if self.reserve:
            try:
                header = header_bytes(self.tensors, self.metadata, size=self.reserve)
            except CheckpointError as exc:
                self.abandon()
                raise CheckpointError(f"{self.path}: {exc}") from None
            self._sink.seek(0)
            self._sink.write(header)
        if not isinstance(self._sink, DirectWriter):  # DirectWriter.close fsyncs itself
            self._sink.flush()
            os.fsync(self._sink.fileno())
        self._sink.close()

    def abandon(self) -> None:
        """Release the file without finishing it (on errors)."""
        if isinstance(self._sink, DirectWriter):
            self._sink.abandon()
        else:
            self._sink.close()

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


class PlannedShards:
    """Resumable shards of a planned checkpoint in `directory`: the split (`plan_shards`) and names are fixed
    up front; a shard is written as `NAME.tmp` (`write`) and becomes `NAME` with a JSON state of the caller's
    beside it (`commit`), so a rerun of the same plan finds it finished (`finished`) and skips it. `finish()`
    writes the index (several shards) and drops the states."""

    def __init__(
        self, directory: Path, tensors: list[TensorSpec], max_shard_bytes: int, align: int = 8, direct: bool = False
    ) -> None:
        self.directory = Path(directory)
        shards = plan_shards(tensors, max_shard_bytes)
        self.shards = dict(zip(shard_names(len(shards)), shards, strict=True))
        self.index = {name: fname for fname, shard in self.shards.items() for name, _, _ in shard}
        self.align, self.direct = align, direct

    def _state_path(self, fname: str) -> Path:
        return self.directory / f"{fname}.state.json"

    def finished(self, fname: str) -> dict[str, Any] | None:
        """The state committed with shard `fname` by an earlier run, or None when it is still to be written."""
        if (self.directory / fname).is_file() and self._state_path(fname).is_file():
            return json.loads(self._state_path(fname).read_text())
        return None

    @contextmanager
    def write(self, fname: str) -> Iterator[ShardFile]:
        """Shard `fname` as a planned `ShardFile` under its `.tmp` name (feed its tensors' bytes in order)."""
        with ShardFile(self.directory / f"{fname}.tmp", self.shards[fname], align=self.align, direct=self.direct) as f:
            yield f

    def commit(self, fname: str, state: dict[str, Any]) -> None:
        """Record `state` beside the written shard and give the shard its final name."""
        self._state_path(fname).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        (self.directory / f"{fname}.tmp").rename(self.directory / fname)

    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        """The states dropped (the output holds only shards), then the index for several shards (none for one;
        `metadata` beside `total_size`)."""
        self.drop_states()
        self.write_index(metadata)

    def drop_states(self) -> None:
        """Forget the resume states: every shard is written (a rerun from here rewrites them all)."""
        for fname in self.shards:
            self._state_path(fname).unlink(missing_ok=True)

    def write_index(self, metadata: dict[str, Any] | None = None) -> None:
        """The index for several shards, none for one: what makes the directory loadable, so written last."""
        if len(self.shards) > 1:
            total = sum(nbytes(dtype, shape) for shard in self.shards.values() for _, dtype, shape in shard)
            write_index(self.directory / INDEX_FILE, self.index, total_size=total, metadata=metadata)


class SafetensorsWriter:
    """Stream tensors into `model-XXXXX-of-YYYYY.safetensors` shards (or one named file) without holding them.

    `names` (every tensor name that may be written) sizes each shard's reserved header. A new shard starts
    when the current one would exceed `max_shard_bytes` (the rule of `plan_shards`). `finish()` gives the
    shards their final names (`STEM.safetensors` or `STEM-0000K-of-0000N.safetensors`) and, for several,
    writes `STEM.safetensors.index.json` with `index_metadata` beside `total_size`.
    """

    def __init__(
        self,
        directory: Path,
        names: Iterable[str],
        max_shard_bytes: int = 5 << 30,
        metadata: dict[str, str] | None = None,
        stem: str = "model",
        index_metadata: dict[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.stem, self.index_metadata = stem, index_metadata
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata or DEFAULT_METADATA
        # Upper bound of the JSON header: name + dtype/shape/offsets (<= 120 chars) per tensor, + metadata.
        self._reserve = sum(len(n) + 120 for n in names) + len(json.dumps(self.metadata)) + 64
        self._reserve += -self._reserve % 8
        self._shards: list[ShardFile] = []
        self._open: ShardFile | None = None
        self._written: set[str] = set()
        self.bytes_written = 0

    def _next_shard(self) -> ShardFile:
        if self._open is not None:
            self._open.close()
        path = self.directory / f".shard-{len(self._shards):05d}.tmp"
        self._open = ShardFile(path, reserve=self._reserve, metadata=self.metadata)
        self._shards.append(self._open)
        return self._open

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (to a new shard when the current one would grow past the limit)."""
        if name in self._written:
            raise CheckpointError(f"safetensors writer: tensor {name!r} written twice")
        shard = self._open
        if shard is None or (shard.data_bytes and shard.data_bytes + tensor.nbytes > self.max_shard_bytes):
            shard = self._next_shard()
        shard.add(name, tensor)
        self._written.add(name)
        self.bytes_written += tensor.nbytes

    def finish(self) -> list[str]:
        """Close the last shard, give shards their final names, write the index if sharded."""
        if self._open is None and not self._shards:
            self._next_shard()
        if self._open is not None:
            self._open.close()
            self._open = None
        names = shard_names(len(self._shards), stem=self.stem)
        weight_map: dict[str, str] = {}
        for shard, final in zip(self._shards, names, strict=True):
            shard.path.rename(self.directory / final)
            weight_map |= {name: final for name, _, _ in shard.tensors}
        if len(names) > 1:
            index = self.directory / f"{self.stem}.safetensors.index.json"
            write_index(index, weight_map, total_size=self.bytes_written, metadata=self.index_metadata)
        return names

    def close(self) -> None:
        """Release an unfinished shard (on errors)."""
        if self._open is not None:
            self._open.abandon()
            self._open = None
