"""Atomic outputs: every file and directory is fsynced before the final rename (an fsync spy records the order
of fsync, rename and unlink calls) for convert, merge and synth; partial directories are removed only when
no one can still be writing them; a resumable partial is adopted only by the same work."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from megatron_ext.checkpoint.atomic import (
    LOCK_FILE,
    STALE_AFTER_S,
    atomic_dir,
    partial_path,
    remove_stale_partials,
    try_lock,
)
from megatron_ext.checkpoint.convert import convert
from megatron_ext.merge.methods import MergeParams
from megatron_ext.merge.run import MergeJob, run_merge

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "coding_trajectories.jsonl"


@dataclass
class Spy:
    """The calls that decide durability, in order: ("fsync", path), ("rename", src, dst), ("unlink", path)."""

    events: list[tuple] = field(default_factory=list)

    def rename_to(self, dst: Path) -> int:
        """Index of the (only) rename onto `dst`."""
        hits = [i for i, e in enumerate(self.events) if e[0] == "rename" and Path(e[2]) == dst]
        assert len(hits) == 1, f"{len(hits)} renames onto {dst}"
        return hits[0]

    def fsynced(self, path: Path, before: int | None = None, after: int = -1) -> bool:
        end = len(self.events) if before is None else before
        return any(e == ("fsync", str(path)) for e in self.events[after + 1 : end])

    def content_fsynced(self, path: Path, before: int) -> bool:
        """`path` was fsynced before `before`, or took its name by a rename from a file fsynced before that."""
        if self.fsynced(path, before=before):
            return True
        renames = [i for i, e in enumerate(self.events[:before]) if e[0] == "rename" and Path(e[2]) == path]
        return any(self.fsynced(Path(self.events[i][1]), before=i) for i in renames)

    def last_change_in(self, directory: Path, before: int) -> int:
        """Index of the last rename or unlink of a name directly inside `directory` before `before` (or -1)."""
        hits = [
            i
            for i, e in enumerate(self.events[:before])
            if e[0] in ("rename", "unlink") and any(Path(p).parent == directory for p in e[1:])
        ]
        return max(hits, default=-1)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    s = Spy()
    real_fsync, real_rename, real_replace, real_unlink = os.fsync, os.rename, os.replace, os.unlink

    def fsync(fd: int) -> None:
        s.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst, *a, **kw) -> None:
        s.events.append(("rename", os.fspath(src), os.fspath(dst)))
        real_rename(src, dst, *a, **kw)

    def replace(src, dst, *a, **kw) -> None:
        s.events.append(("rename", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst, *a, **kw)

    def unlink(path, *a, **kw) -> None:
        s.events.append(("unlink", os.fspath(path)))
        real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    return s


def _assert_durable_before_rename(spy: Spy, out: Path) -> None:
    """Every file and directory of `out` was fsynced (under its partial name, or a file under the `.pending`
    name it was renamed from) after its last change and before the rename that published it; the parent
    directory was fsynced after that rename."""
    final = spy.rename_to(out)
    partial = Path(spy.events[final][1])
    assert partial.name.startswith(f".{out.name}.partial-{socket.gethostname()}-")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for f in files:
        assert spy.content_fsynced(partial / f.relative_to(out), final), f"{f} not fsynced before the rename"
    for d in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        where = partial / d.relative_to(out)
        assert spy.fsynced(where, before=final, after=spy.last_change_in(where, final)), f"{d} not fsynced last"
    assert spy.fsynced(out.parent, after=final), "parent directory not fsynced after the rename"
    assert not (out / LOCK_FILE).exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize("to", ["megatron", "mistral"])
def test_convert_fsyncs_everything_before_the_rename(tiny_dir: Path, tmp_path: Path, spy: Spy, to: str) -> None:
    out = tmp_path / "out"
    convert(tiny_dir / "voxtral-hf", out, to, progress=False)
    _assert_durable_before_rename(spy, out)


@pytest.mark.parametrize(
    ("out_format", "shard_bytes"),
    [("hf", 1 << 30), ("hf", 1 << 16), ("megatron", 1 << 30)],
    ids=["hf-single-shard", "hf-multi-shard", "torch_dist"],
)
def test_merge_fsyncs_everything_before_the_rename(
    tiny_dir: Path, tmp_path: Path, spy: Spy, out_format: str, shard_bytes: int
) -> None:
    out = tmp_path / "out"
    job = MergeJob(
        tiny_dir / "devstral-hf",
        tiny_dir / "voxtral-hf",
        out,
        MergeParams(method="linear", alpha=0.1),
        rope_from="devstral",
        out_format=out_format,
        shard_bytes=shard_bytes,
        progress=False,
    )
    run_merge(job)
    shards = list(out.glob("*.safetensors"))
    if out_format == "hf":
        assert (len(shards) > 1) == (shard_bytes < 1 << 20)
    _assert_durable_before_rename(spy, out)


def test_tokenizer_alignment_output_is_an_atomic_directory(tiny_dir: Path, tmp_path: Path, spy: Spy) -> None:
    from megatron_ext.tokenizer.align import write_alignment

    out = tmp_path / "aligned"
    write_alignment(tiny_dir / "devstral-hf" / "tekken.json", tiny_dir / "voxtral-hf" / "tekken.json", out)
    assert sorted(p.name for p in out.iterdir()) == ["tekken.json", "tokenizer_map.json"]
    _assert_durable_before_rename(spy, out)


def test_synth_fsyncs_its_shard_before_the_done_marker(tmp_path: Path, spy: Spy) -> None:
    from megatron_ext.data.synth.config import SynthConfig
    from megatron_ext.data.synth.pipeline import run

    out = tmp_path / "out"
    cfg = SynthConfig(input=SAMPLE, output=out, tts_engine="espeak", energon_prepare=False, num_shards=2)
    assert run(cfg)["complete"]
    for tag in ("00000-of-00002", "00001-of-00002"):
        done = out / "completions" / tag
        final = spy.rename_to(done)
        tar = out / "wds" / f"shard-{tag}.tar"
        for f in (out / f"samples-{tag}.jsonl", out / f"judgments-{tag}.jsonl"):
            assert spy.fsynced(f, before=final), f"{f} not fsynced before {done}"
        tar_rename = spy.rename_to(tar)
        assert spy.fsynced(Path(spy.events[tar_rename][1]), before=tar_rename)
        assert spy.fsynced(tar.parent, before=final, after=tar_rename)
        assert spy.fsynced(out, before=final)
        assert spy.fsynced(done.parent, after=final)


# ---- partial directories: who may remove them -----------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _partial(out: Path, host: str, pid: int, age_s: float = 0.0) -> Path:
    p = partial_path(out, host, pid)
    p.mkdir()
    (p / "model.safetensors").write_bytes(b"x")
    if age_s:
        t = time.time() - age_s
        for q in (p / "model.safetensors", p):
            os.utime(q, (t, t))
    return p


def test_partial_removal_rules(tmp_path: Path) -> None:
    out = tmp_path / "out"
    here, old = socket.gethostname(), STALE_AFTER_S + 60
    ours_dead = _partial(out, here, _dead_pid())
    ours_alive = _partial(out, here, os.getppid())
    other_fresh = _partial(out, "node-17", 4242)
    other_old = _partial(out, "node-18", 4242, age_s=old)
    locked_dead = _partial(out, here, _dead_pid(), age_s=old)
    locked_old = _partial(out, "node-19", 4242, age_s=old)
    holders = [try_lock(locked_dead / LOCK_FILE), try_lock(locked_old / LOCK_FILE)]
    try:
        removed = remove_stale_partials(out)
    finally:
        for fd in holders:
            os.close(fd)
    assert sorted(removed) == sorted([ours_dead, other_old])
    for p in (ours_alive, other_fresh, locked_dead, locked_old):
        assert p.is_dir(), f"{p.name} was removed"
    assert not ours_dead.exists() and not other_old.exists()


def test_a_locked_partial_of_this_process_is_kept(tmp_path: Path) -> None:
    """An output being written by this very process (its lock held) is not taken for a leftover of it."""
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        assert (tmp / LOCK_FILE).is_file()
        assert remove_stale_partials(out) == [] and tmp.is_dir()
        (tmp / "a").write_text("a")
    assert (out / "a").read_text() == "a" and not (out / LOCK_FILE).exists()


def test_resumable_partial_is_adopted_only_by_the_same_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, resume_key="plan-A") as tmp:
        (tmp / "shard-1").write_text("done")
        raise KeyboardInterrupt  # an interrupted run keeps its partial directory
    assert tmp.is_dir() and not out.exists()
    os.rename(tmp, partial_path(out, socket.gethostname(), _dead_pid()))  # as if a killed process left it
    with atomic_dir(out, resume_key="plan-B") as other:
        assert not (other / "shard-1").exists()  # another plan: started afresh, the old partial removed
    assert out.is_dir() and not list(tmp_path.glob(".out.partial-*"))
    os.rename(out, tmp_path / "first")
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, resume_key="plan-A") as tmp:
        (tmp / "shard-1").write_text("done")
        raise KeyboardInterrupt
    with atomic_dir(out, resume_key="plan-A") as again:  # same process, lock released: adopted
        assert (again / "shard-1").read_text() == "done"
    assert sorted(p.name for p in out.iterdir()) == ["shard-1"]


def test_failed_non_resumable_output_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_overwrite_replaces_a_plain_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("not a directory")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "a").write_text("a")
    assert (out / "a").read_text() == "a" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
