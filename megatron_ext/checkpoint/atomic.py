"""Atomic output directories: everything is written to a hidden sibling and renamed only when complete.

A converter killed at any point leaves at most a `.NAME.partial-PID` sibling, never `NAME` itself;
the next run removes partial siblings whose process is gone and starts again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from megatron_ext.errors import ProjectError


class CheckpointError(ProjectError, ValueError):
    """Bad checkpoint input or output; the message is one line naming the file, tensor or field."""


PARTIAL_TAG = ".partial-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete `.OUT.partial-PID` siblings left by dead processes; returns what was removed."""
    removed = []
    for p in out.parent.glob(f".{out.name}{PARTIAL_TAG}*"):
        pid = p.name.rsplit(PARTIAL_TAG, 1)[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block exits without an exception."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: output already exists (remove it or pass --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = out.parent / f".{out.name}{PARTIAL_TAG}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
