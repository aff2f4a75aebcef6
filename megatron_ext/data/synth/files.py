"""Crash-safe files: torn-line repair of append-only JSONL and exclusive reservations (atomic writes and the
locks themselves are `checkpoint/atomic.py`'s, shared with every checkpoint writer)."""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megatron_ext.checkpoint.atomic import try_lock


def repair_jsonl(path: Path) -> int:
    """Cut a torn last line (no trailing newline) left by a killed writer; return the complete line count."""
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            f.truncate(keep)
    return data.count(b"\n", 0, keep)


def read_jsonl(path: Path) -> Iterator[dict]:
    """Objects of the complete lines of a JSONL file (none if it does not exist)."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                yield json.loads(line)


def dumps_line(obj: dict) -> str:
    """One deterministic JSONL line (UTF-8 kept, compact separators, trailing newline)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


@contextmanager
def reserved(path: Path) -> Iterator[bool]:
    """Hold an exclusive, non-blocking lock on `path`; yields False if another process holds it.

    The kernel drops the lock when its holder dies, so a SIGKILLed worker never leaves a stale reservation.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = try_lock(path)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)
