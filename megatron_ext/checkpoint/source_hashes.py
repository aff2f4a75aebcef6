"""sha256 of a conversion's source files, without re-reading a file whose hash is already known.

Hashing a multi-GB shard is CPU-bound (about 0.35 GB/s per core on CPUs without SHA instructions, several
times the disk time), so each file is hashed once:
- a file in a Hugging Face hub cache is a symlink to `blobs/<sha256>` (the LFS content address, checked
  by huggingface_hub when it downloaded the file): the blob's name is the hash;
- otherwise a per-user cache (`$MEGATRON_EXT_CACHE` or `~/.cache/megatron_ext`, file `sha256.jsonl`)
  maps (device, inode, size, mtime) to a hash computed earlier; any rewrite of the file changes that
  key, and a file that changed while it was hashed is not cached. Lines are appended whole (one
  `write` with O_APPEND), so concurrent conversions (array jobs) can share the cache.
Files still unknown are hashed in parallel, one thread per file (hashlib releases the GIL).
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_ext.checkpoint.metadata import sha256_file

CACHE_ENV = "MEGATRON_EXT_CACHE"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def cache_path() -> Path:
    """The hash cache file of this user (directory from $MEGATRON_EXT_CACHE, else ~/.cache/megatron_ext)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "sha256.jsonl"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatron_ext" / "sha256.jsonl"


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


def source_sha256(paths: list[Path], reuse: bool = True) -> list[str]:
    """Hex sha256 of each file; `reuse=False` hashes every file afresh (and refreshes the cache)."""
    known = _load_cache() if reuse else {}
    found: dict[Path, str] = {}
    for p in paths:
        digest = (_hub_blob_hash(p) or known.get(_key(p))) if reuse else None
        if digest:
            found[p] = digest
    todo = [p for p in paths if p not in found]
    if todo:
        with ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1)) as pool:
            found.update(zip(todo, pool.map(_hash_and_record, todo), strict=True))
    return [found[p] for p in paths]
