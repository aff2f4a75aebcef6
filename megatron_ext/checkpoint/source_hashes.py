"""sha256 of a conversion's source files, without re-reading a file whose hash is already known.

Hashing a multi-GB shard is CPU-bound (about 0.35 GB/s per core on CPUs without SHA instructions, several
times the disk time), so each file is hashed once:
- a file in a Hugging Face hub cache is a symlink to `blobs/<sha256>` (the LFS content address, checked
  by huggingface_hub when it downloaded the file): the blob's name is the hash;
- otherwise a per-user cache (`$MEGATRON_EXT_CACHE` or `~/.cache/megatron_ext`, file `sha256.jsonl`)
  maps (device, inode, size, mtime) to a hash computed earlier; any rewrite of the file changes that
  key, and a file that changed while it was hashed is not cached. Lines are appended whole (one
  `write` with O_APPEND), so concurrent conversions (array jobs) can share the cache.
Files still unknown are hashed in parallel, one thread per file (hashlib releases the GIL); `prefetch`
starts that early (the converter calls it before importing torch, ~3 s of a hash that bounds a cold
conversion), and `source_sha256` takes over what was started. This module imports no torch.
"""

from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import Future
from pathlib import Path

from megatron_ext.checkpoint.metadata import sha256_file
from megatron_ext.user_cache import cache_dir

_HEX64 = re.compile(r"[0-9a-f]{64}")
_started: dict[str, Future] = {}  # file key -> its hash, being computed in this process


def cache_path() -> Path:
    """The hash cache file of this user (in `user_cache.cache_dir()`)."""
    return cache_dir() / "sha256.jsonl"


def _key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _hub_blob_hash(path: Path) -> str | None:
    if not path.is_symlink():
        return None
    target = path.resolve()
    return target.name if target.parent.name == "blobs" and _HEX64.fullmatch(target.name) else None


def _load_cache() -> dict[str, str]:
    try:
        lines = cache_path().read_text().splitlines()
    except OSError:
        return {}
    known = {}
    for line in lines:
        try:
            entry = json.loads(line)
            known[entry["key"]] = entry["sha256"]
        except (ValueError, KeyError, TypeError):
            continue  # a torn or foreign line: ignore it
    return known


def _hash_and_record(path: Path) -> str:
    key = _key(path)
    digest = sha256_file(path)
    if _key(path) == key:  # unchanged while hashed
        # Newline first as well: a line torn by a killed writer cannot swallow this one.
        line = "\n" + json.dumps({"key": key, "path": str(path.resolve()), "sha256": digest}) + "\n"
        try:
            cache_path().parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(cache_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError:
            pass  # an unwritable cache only costs a re-hash next time
    return digest


def _start(path: Path) -> Future:
    """Hash `path` in a daemon thread (an error exit never waits for a multi-GB hash)."""
    fut: Future = Future()

    def work() -> None:
        try:
            fut.set_result(_hash_and_record(path))
        except OSError as exc:
            fut.set_exception(exc)

    threading.Thread(target=work, daemon=True, name=f"sha256 {path.name}").start()
    return fut


def _known(path: Path, cache: dict[str, str]) -> str | None:
    return _hub_blob_hash(path) or cache.get(_key(path))


def _lookup(path: Path, cache: dict[str, str], reuse: bool) -> str | Future:
    """The file's hash when known (and `reuse`), else its hashing in this process, started if need be."""
    known = _known(path, cache) if reuse else None
    if known:
        return known
    key = _key(path)
    if key not in _started:
        _started[key] = _start(path)
    return _started[key]


def prefetch(paths: list[Path], reuse: bool = True) -> None:
    """Start hashing the files whose hash is not known yet; `source_sha256` waits for them."""
    cache = _load_cache() if reuse else {}
    for p in paths:
        _lookup(p, cache, reuse)


def source_sha256(paths: list[Path], reuse: bool = True) -> list[str]:
    """Hex sha256 of each file; `reuse=False` hashes every file afresh (and refreshes the cache)."""
    cache = _load_cache() if reuse else {}
    pending = [_lookup(p, cache, reuse) for p in paths]
    return [h if isinstance(h, str) else h.result() for h in pending]
