"""Crash-safe files: atomic writes, torn-line repair of append-only JSONL, and exclusive reservations."""

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, then rename over it: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
