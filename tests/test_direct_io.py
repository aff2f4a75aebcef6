"""DirectWriter: the file holds exactly the bytes written, whatever their sizes and memory alignment, with
and without O_DIRECT; aligned runs from aligned memory really bypass the staging copy."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from megatron_ext.checkpoint import direct_io
from megatron_ext.checkpoint.direct_io import ALIGN, DirectWriter, aligned_empty


def _pieces(seed: int) -> list[torch.Tensor]:
    """Random bytes in pieces of awkward and aligned sizes, from aligned and misaligned memory."""
    rng = random.Random(seed)
    out = []
    for _ in range(40):
        n = rng.choice([0, 1, 7, 100, ALIGN - 1, ALIGN, 2 * ALIGN, 3 * ALIGN + 5, 100_003, 1 << 20])
        shift = rng.choice([0, 0, 8, 100])
        t = aligned_empty(n + shift)[shift:]
        gen = torch.Generator().manual_seed(rng.randrange(1 << 31))
        t.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen))
        out.append(t)
    return out


@pytest.mark.parametrize("staging", [ALIGN, 3 * ALIGN, 64 * ALIGN])
def test_writes_exactly_the_bytes_given(tmp_path: Path, staging: int) -> None:
    pieces = _pieces(staging)
    with DirectWriter(tmp_path / "f.bin", staging_bytes=staging) as f:
        for p in pieces:
            assert f.write(p.numpy()) == p.numel()
        assert f.position == sum(p.numel() for p in pieces)
    assert (tmp_path / "f.bin").read_bytes() == b"".join(p.numpy().tobytes() for p in pieces)


def test_aligned_runs_skip_the_staging_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Aligned memory at an aligned file offset is written from the caller's buffer; the rest is staged."""
    writes: list[int] = []
    real_write = direct_io.os.write
    monkeypatch.setattr(direct_io.os, "write", lambda fd, view: writes.append(len(view)) or real_write(fd, view))
    block = aligned_empty(8 * ALIGN)
    block.fill_(7)
    with DirectWriter(tmp_path / "f.bin") as f:
        if not f.direct:
            pytest.skip(f"{tmp_path} has no O_DIRECT")
        f.write(block.numpy())  # straight from `block`
        f.write(block[:100].numpy())  # staged
        f.write(block[: ALIGN - 100].numpy())  # staged; the file is aligned again: the staging is written
        f.write(block.numpy())  # straight again
        f.write(block[:10].numpy())  # the tail, through the page cache at close
    assert writes == [8 * ALIGN, ALIGN, 8 * ALIGN, 10]
    assert (tmp_path / "f.bin").read_bytes() == bytes([7]) * (17 * ALIGN + 10)


def test_filesystem_without_direct_io(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where open(O_DIRECT) is refused (tmpfs), the writer writes through the page cache, same bytes."""
    real_open = direct_io.os.open

    def refuse_direct(path, flags, mode=0o777):
        if flags & direct_io.os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(direct_io.os, "open", refuse_direct)
    pieces = _pieces(1)
    with DirectWriter(tmp_path / "f.bin") as f:
        assert not f.direct
        for p in pieces:
            f.write(p.numpy())
    assert (tmp_path / "f.bin").read_bytes() == b"".join(p.numpy().tobytes() for p in pieces)


def test_aligned_empty_is_aligned() -> None:
    for n in (0, 1, ALIGN, 5 * ALIGN + 3):
        t = aligned_empty(n)
        assert t.numel() == n and t.dtype == torch.uint8 and t.data_ptr() % ALIGN == 0
