"""Checkpoint metadata (`checkpoint_meta.json`) written with every Megatron checkpoint and read by every tool.

It carries what the tensors alone cannot: the full `ModelConfig` (rope/YaRN and llama-4 query scaling
included, so they never drop out of a merge), the tokenizer file and its sha256, which parts exist,
the source files' sha256, the command that made it, and the list of files with their sizes and sha256. It is
written last, so a directory without it (or with files that disagree with it) is not a checkpoint.

On load every listed file is checked for presence and size and, unless verification is off (`--no-verify`,
`verification(False)`), for its sha256. A file's hash is computed once per (device, inode, size, mtime)
and kept in the user cache (`source_hashes.py`), so repeated loads of an unchanged checkpoint hash nothing.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_ext.checkpoint.atomic import LOCK_FILE, PARTIAL_TAG, RESUME_FILE, CheckpointError
from megatron_ext.checkpoint.megatron_lm import resolve
from megatron_ext.config import ConfigError, ModelConfig

META_FILE = "checkpoint_meta.json"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tekken.json"
NO_VERIFY_ENV = "MEGATRON_EXT_NO_VERIFY"  # "1": skip the sha256 check on load (inherited by worker processes)


def sha256_file(path: Path, window: int = 1 << 26) -> str:
    """Hex sha256 of a file, hashed straight from 64 MiB memory-mapped windows (no copy into a read
    buffer: the hash is the CPU-bound part of a conversion, and each window is unmapped before the next)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        for offset in range(0, size, window):
            with mmap.mmap(
                f.fileno(),
                min(window, size - offset),
                prot=mmap.PROT_READ,
                offset=offset,
                flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
            ) as view:
                h.update(view)
    return h.hexdigest()


def verification_enabled() -> bool:
    """False when the user asked to skip the sha256 check of checkpoint files on load (`--no-verify`)."""
    return os.environ.get(NO_VERIFY_ENV) != "1"


@contextmanager
def verification(enabled: bool) -> Iterator[None]:
    """Run a block with the sha256 check on load on or off (through the environment, so that training's
    worker processes inherit it); the previous setting is restored afterwards."""
    before = os.environ.get(NO_VERIFY_ENV)
    os.environ[NO_VERIFY_ENV] = "0" if enabled else "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[NO_VERIFY_ENV]
        else:
            os.environ[NO_VERIFY_ENV] = before


def file_records(directory: Path, skip: frozenset[str] = frozenset()) -> tuple[dict[str, int], dict[str, str]]:
    """Sizes and sha256 of the plain files in `directory` except `skip` (hashed in parallel, cached)."""
    from megatron_ext.checkpoint.source_hashes import source_sha256  # imports this module

    paths = [p for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name not in skip]
    hashes = source_sha256(paths)
    return {p.name: p.stat().st_size for p in paths}, {p.name: h for p, h in zip(paths, hashes, strict=True)}


def verify_files(directory: Path, sizes: Any, digests: Any, record: Path) -> None:
    """Each file `record` lists exists with its size and (when verification is on) its sha256; one
    CheckpointError naming the first file that differs. Names are plain file names inside `directory`."""
    if not isinstance(sizes, dict) or not isinstance(digests, dict):
        raise CheckpointError(f"{record}: records no file sizes and sha256 (`files`, `sha256` objects)")
    for name, size in sizes.items():
        if not isinstance(name, str) or Path(name).name != name or name in {"", ".", ".."}:
            raise CheckpointError(f"{record}: file name {name!r} is not a plain name inside {directory}")
        if not isinstance(size, int) or isinstance(size, bool):
            raise CheckpointError(f"{record}: size of {name} is {size!r}, not an integer")
        f = directory / name
        if not f.is_file() or f.stat().st_size != size:
            have = f.stat().st_size if f.is_file() else "missing"
            raise CheckpointError(f"{f}: expected {size} bytes, found {have} (incomplete or altered checkpoint)")
    if not verification_enabled():
        return
    from megatron_ext.checkpoint.source_hashes import source_sha256  # imports this module

    names = [n for n in sizes if n in digests]
    for name, got in zip(names, source_sha256([directory / n for n in names]), strict=True):
        if got != digests[name]:
            raise CheckpointError(
                f"{directory / name}: sha256 differs from the one recorded in {record.name} "
                "(altered or corrupted since it was written; --no-verify skips this check)"
            )


def model_parts(cfg: ModelConfig) -> dict[str, bool]:
    """Which parts of `AudioLanguageModel` a checkpoint of `cfg` holds."""
    return {"language_model": True, "audio_encoder": cfg.has_audio, "audio_projector": cfg.has_audio}


def command_line() -> str:
    """The current process's command line, shell-quoted (recorded in the metadata)."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


@dataclass
class CheckpointMeta:
    """Everything a tool needs besides the tensors; `extra` holds tool-specific records (e.g. a merge recipe)."""

    model: ModelConfig
    tokenizer_sha256: str | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)  # [{path, sha256, bytes}]
    command: str = ""
    tool: str = "convert"
    parallel: dict[str, int] = field(default_factory=lambda: {"tp": 1, "pp": 1})
    files: dict[str, int] = field(default_factory=dict)  # file name -> size in bytes (filled by writers)
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> sha256 (filled by writers)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "complete": True,
            "model": self.model.to_dict(),
            "parts": model_parts(self.model),
            "tokenizer": {"file": TOKENIZER_FILE, "sha256": self.tokenizer_sha256} if self.tokenizer_sha256 else None,
            "sources": self.sources,
            "command": self.command,
            "tool": self.tool,
            "parallel": self.parallel,
            "files": self.files,
            "sha256": self.sha256,
            "extra": self.extra,
        }


def write_meta(directory: Path, meta: CheckpointMeta) -> None:
    """Record every file already in `directory` with its size and sha256, then write the metadata file (last)."""
    directory = Path(directory)
    skip = frozenset({META_FILE, LOCK_FILE, RESUME_FILE})  # the last two: bookkeeping of the partial directory
    meta.files, meta.sha256 = file_records(directory, skip)
    text = json.dumps(meta.to_dict(), indent=2, sort_keys=True) + "\n"
    tmp = directory / (META_FILE + ".tmp")
    tmp.write_text(text)
    tmp.rename(directory / META_FILE)


def _rope_missing_message(path: Path) -> str:
    return (
        f"{path}: checkpoint metadata has no rope settings (model.decoder.rope); supply them with "
        f"`python tools/convert.py --input {path} --output NEW_DIR --to megatron --rope-from "
        f"PARENT/config.json|params.json` (or re-convert from the parent checkpoint)"
    )


def read_meta(directory: Path, check_files: bool = True) -> CheckpointMeta:
    """Read and validate a checkpoint's metadata (in the iteration directory the tracker names, if there is
    one); refuses partial directories, missing rope settings and (with `check_files`) files missing, resized
    or, unless verification is off, with another sha256."""
    directory = Path(directory)
    if PARTIAL_TAG in directory.name:
        raise CheckpointError(f"{directory}: is a partial (interrupted) output, not a checkpoint; re-run the tool")
    directory = resolve(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {META_FILE} (not a complete megatron_ext checkpoint)")
    data = read_json_object(path)
    if not data.get("complete"):
        raise CheckpointError(f"{path}: checkpoint is marked incomplete")
    if "rope" not in data.get("model", {}).get("decoder", {}):
        raise CheckpointError(_rope_missing_message(directory))
    try:
        model = ModelConfig.from_dict(data["model"])
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"{path}: invalid model config: {exc}") from None
    files, digests = data.get("files", {}), data.get("sha256", {})
    if check_files:
        verify_files(directory, files, digests, path)
    tok = data.get("tokenizer") or {}
    tok_file = directory / TOKENIZER_FILE
    if check_files and tok.get("sha256") and tok_file.is_file() and sha256_file(tok_file) != tok["sha256"]:
        raise CheckpointError(f"{tok_file}: sha256 differs from the one recorded in {META_FILE}")
    return CheckpointMeta(
        model=model,
        tokenizer_sha256=tok.get("sha256"),
        sources=data.get("sources", []),
        command=data.get("command", ""),
        tool=data.get("tool", ""),
        parallel=data.get("parallel", {"tp": 1, "pp": 1}),
        files=files,
        sha256=digests,
        extra=data.get("extra", {}),
    )


def load_model_config(directory: Path) -> ModelConfig:
    """The `ModelConfig` of a Megatron checkpoint (validated as `read_meta` does)."""
    return read_meta(directory).model


def is_complete_checkpoint(directory: Path) -> bool:
    """True when `read_meta` accepts `directory`."""
    try:
        read_meta(directory)
    except CheckpointError:
        return False
    return True


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (our metadata, adapter configs); one CheckpointError naming it."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data
