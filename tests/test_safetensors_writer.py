"""The one safetensors writer: planned and header-last files hold the same tensors (read back by the
`safetensors` library), both sharders split by the same rule, a resumed planned shard is kept, and a file
whose bytes disagree with its header is refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.direct_io import ALIGN
from megatron_ext.checkpoint.safetensors_writer import (
    PlannedShards,
    SafetensorsWriter,
    ShardFile,
    plan_shards,
    tensor_bytes,
)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(300, 17, generator=gen).to(torch.bfloat16),
        "b.bias": torch.randn(5, generator=gen),
        "c.empty": torch.empty(0, 4),
        "d.ids": torch.randint(0, 9, (1000,), generator=gen),
        "e.big": torch.randn(64, 1024, generator=gen).to(torch.float16),
    }


def _specs(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def _header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for n, t in want.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n


@pytest.mark.parametrize("direct", [False, True])
def test_planned_and_header_last_files_hold_the_same_tensors(tmp_path: Path, direct: bool) -> None:
    tensors = _tensors()
    with ShardFile(tmp_path / "planned.safetensors", _specs(tensors), align=ALIGN, direct=direct) as f:
        for t in tensors.values():
            flat = tensor_bytes(t)
            f.write(flat[: len(flat) // 3])  # any split of the bytes, e.g. row blocks
            f.write(flat[len(flat) // 3 :])
    with ShardFile(tmp_path / "last.safetensors", reserve=4096) as f:
        for n, t in tensors.items():
            f.add(n, t)
    _assert_same(load_file(tmp_path / "planned.safetensors"), tensors)
    _assert_same(load_file(tmp_path / "last.safetensors"), tensors)
    assert (8 + _header_length(tmp_path / "planned.safetensors")) % ALIGN == 0  # data starts on a page
    assert _header_length(tmp_path / "last.safetensors") == 4096  # exactly the reserved area


def test_short_data_and_small_reserve_are_refused(tmp_path: Path) -> None:
    tensors = _tensors()
    with pytest.raises(CheckpointError, match="tensor bytes written, header says"):
        with ShardFile(tmp_path / "short.safetensors", _specs(tensors)) as f:
            f.write(tensor_bytes(tensors["a.weight"]))
    with pytest.raises(CheckpointError, match="small.safetensors: safetensors header larger than reserved"):
        with ShardFile(tmp_path / "small.safetensors", reserve=64) as f:
            f.add("a.weight", tensors["a.weight"])
    with pytest.raises(ValueError, match="planned `tensors` or a `reserve`"):
        ShardFile(tmp_path / "x", reserve=64, direct=True)


def test_streaming_and_planned_sharding_split_alike(tmp_path: Path) -> None:
    tensors = _tensors()
    limit = 40_000
    (tmp_path / "stream").mkdir()
    writer = SafetensorsWriter(tmp_path / "stream", tensors, max_shard_bytes=limit)
    for n, t in tensors.items():
        writer.write(n, t)
    names = writer.finish()
    planned = plan_shards(_specs(tensors), limit)
    assert len(names) == len(planned) > 1
    for fname, shard in zip(names, planned, strict=True):
        assert list(load_file(tmp_path / "stream" / fname)) == [n for n, _, _ in shard]
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    with pytest.raises(CheckpointError, match="written twice"):
        writer.write("b.bias", tensors["b.bias"])


def test_planned_shards_resume_and_finish(tmp_path: Path) -> None:
    tensors = _tensors()

    def write(shards: PlannedShards, fname: str) -> None:
        with shards.write(fname) as f:
            for n, _, _ in shards.shards[fname]:
                f.write(tensor_bytes(tensors[n]))
        shards.commit(fname, {"shard": fname})

    first = PlannedShards(tmp_path, _specs(tensors), 40_000, align=ALIGN)
    done, rest = list(first.shards)[0], list(first.shards)[1:]
    write(first, done)  # an interrupted run finished one shard
    (tmp_path / f"{rest[0]}.tmp").write_bytes(b"torn")  # and died inside the next
    again = PlannedShards(tmp_path, _specs(tensors), 40_000, align=ALIGN)
    assert again.finished(done) == {"shard": done} and again.finished(rest[0]) is None
    for fname in rest:
        write(again, fname)
    again.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*again.shards, "model.safetensors.index.json"])
    got = {n: t for fname in again.shards for n, t in load_file(tmp_path / fname).items()}
    _assert_same(got, tensors)
