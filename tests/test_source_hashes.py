"""Source-file sha256 reuse: HF hub blob names, the per-user cache keyed by file identity, --rehash."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from megatron_ext.checkpoint import source_hashes
from megatron_ext.checkpoint.source_hashes import cache_path, source_sha256
from megatron_ext.user_cache import CACHE_ENV


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return cache_path()


def _files(d: Path, n: int = 3) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"model-{i}.safetensors"
        p.write_bytes(os.urandom(100_000 + i))
        out.append(p)
    return out


def _no_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: Path) -> str:
        raise AssertionError(f"{path} was hashed")

    monkeypatch.setattr(source_hashes, "sha256_file", fail)


def test_hashes_once_then_reuses(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _files(tmp_path / "ckpt")
    truth = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    assert source_sha256(files) == truth
    assert len([line for line in cache.read_text().splitlines() if line]) == 3
    _no_hashing(monkeypatch)
    assert source_sha256(files) == truth


def test_rewritten_file_is_hashed_again(tmp_path: Path, cache: Path) -> None:
    files = _files(tmp_path / "ckpt", 1)
    source_sha256(files)
    files[0].write_bytes(b"other content")
    os.utime(files[0], ns=(1, 1))  # a different mtime: a different key even within one clock tick
    assert source_sha256(files) == [hashlib.sha256(b"other content").hexdigest()]


def test_rehash_ignores_known_hashes(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _files(tmp_path / "ckpt", 2)
    source_sha256(files)
    cache.write_text(cache.read_text().replace(source_sha256(files)[0], "0" * 64))  # a stale entry
    assert source_sha256(files)[0] == "0" * 64
    assert source_sha256(files, reuse=False)[0] == hashlib.sha256(files[0].read_bytes()).hexdigest()


def test_hub_cache_blob_name_is_the_hash(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(50_000)
    digest = hashlib.sha256(data).hexdigest()
    blob = tmp_path / "models--org--m" / "blobs" / digest
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snap = tmp_path / "models--org--m" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(Path("../../blobs") / digest)
    _no_hashing(monkeypatch)
    assert source_sha256([snap / "model.safetensors"]) == [digest]


def test_torn_cache_line_is_ignored(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _files(tmp_path / "ckpt", 1)
    cache.parent.mkdir(parents=True)
    cache.write_text('{"key": "1:2:3:4", "sha2')  # a writer killed mid-line
    truth = [hashlib.sha256(files[0].read_bytes()).hexdigest()]
    assert source_sha256(files) == truth
    _no_hashing(monkeypatch)
    assert source_sha256(files) == truth  # the entry appended after the torn line is readable


def test_cli_records_true_hashes_started_early_and_rehash_ignores_a_stale_cache(tiny_dir: Path, tmp_path: Path) -> None:
    """tools/convert.py starts hashing before importing torch; the metadata holds the true sha256, and
    --rehash replaces a wrong cached value."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    src = tiny_dir / "devstral-hf"
    truth = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    env = {**os.environ, CACHE_ENV: str(tmp_path / "cache")}

    def run(out: str, *extra: str) -> str:
        cmd = [
            sys.executable,
            str(root / "tools" / "convert.py"),
            "--input",
            str(src),
            "--output",
            str(tmp_path / out),
            "--to",
            "megatron",
            "--no-progress",
            *extra,
        ]
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=300)
        sources = json.loads((tmp_path / out / "release" / "checkpoint_meta.json").read_text())["sources"]
        return next(s["sha256"] for s in sources if s["path"].endswith("model.safetensors"))

    assert run("a") == truth
    cache = tmp_path / "cache" / "sha256.jsonl"
    cache.write_text(cache.read_text().replace(truth, "f" * 64))  # a stale entry for the same file
    assert run("b") == "f" * 64  # reused, as documented
    assert run("c", "--rehash") == truth
