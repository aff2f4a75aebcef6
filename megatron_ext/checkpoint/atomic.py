"""Atomic, resumable outputs: a directory is written under a hidden partial name, fsynced, then renamed.

Every tool that writes a checkpoint or a dataset directory `NAME` writes into the sibling
`.NAME.partial-HOST-PID` while holding an flock on `LOCK_FILE` inside it. When complete, the lock file is
removed, every file and directory in it is fsynced, it is renamed to `NAME` and the parent directory is
fsynced: after a kill or a power loss `NAME` is absent or complete. Single files (markers, manifests,
tars) get the same treatment through `write_atomic`.

A partial sibling left behind is removed, or adopted by a run that resumes it, only when no one can still
be writing it: its lock is free, and it is ours (this host, and its PID is not alive or is this process)
or untouched for `STALE_AFTER_S`. A PID says nothing about another host (SLURM nodes sharing a
filesystem), so another host's partial is only removed once that old.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from megatron_ext.errors import ProjectError


class CheckpointError(ProjectError, ValueError):
    """Bad checkpoint input or output; the message is one line naming the file, tensor or field."""


PARTIAL_TAG = ".partial-"
LOCK_FILE = ".lock"
PENDING_SUFFIX = ".pending"  # a file named only when its directory is published (see `publish`)
RESUME_FILE = ".resume"  # in a resumable partial directory: the key of the work it holds
# A partial directory of another host (or one we cannot tell) is abandoned when nothing in it changed for a
# day: longer than any single write of ours takes, and the lock protects live writers anyway.
STALE_AFTER_S = 24 * 3600


def partial_path(out: Path, host: str | None = None, pid: int | None = None) -> Path:
    """The hidden sibling `.NAME.partial-HOST-PID` that becomes `out` (this host and process by default)."""
    host = socket.gethostname() if host is None else host
    pid = os.getpid() if pid is None else pid
    return out.parent / f".{out.name}{PARTIAL_TAG}{host}-{pid}"


def fsync_dir(path: Path) -> None:
    """fsync a directory: makes the names created, renamed or removed in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory (deepest first), under `root` and `root` itself."""
    for here, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(here, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(here))


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file through a fsynced temporary sibling (private to this thread), rename it over `path`, and
    fsync the directory: readers see the old or the new file, never half of one, even after a power loss."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_native_id()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def try_lock(path: Path) -> int | None:
    """An exclusive, non-blocking flock on `path` (created if needed): its descriptor (close it to unlock), or
    None when another holder has it. The kernel drops the lock when its holder dies."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    except (FileNotFoundError, NotADirectoryError):
        return None  # its directory vanished or is not one
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _last_change(path: Path) -> float:
    """Newest mtime of a directory and its direct entries."""
    times = [path.lstat().st_mtime]
    with contextlib.suppress(OSError):
        times += [p.lstat().st_mtime for p in path.iterdir()]
    return max(times)


def _abandoned(partial: Path, now: float) -> bool:
    """Whether no live writer can own `partial` by its name and age (the lock is checked by the caller)."""
    host, _, pid = partial.name.rsplit(PARTIAL_TAG, 1)[1].rpartition("-")
    if host == socket.gethostname() and pid.isdigit():
        return int(pid) == os.getpid() or not _pid_alive(int(pid))
    try:
        return now - _last_change(partial) > STALE_AFTER_S
    except OSError:
        return False  # vanished meanwhile


def _claim_stale(out: Path) -> Iterator[tuple[Path, int]]:
    """Abandoned, unlocked partial siblings of `out`, each yielded with its lock held (the caller closes it)."""
    now = time.time()
    for partial in sorted(out.parent.glob(f".{out.name}{PARTIAL_TAG}*")):
        if partial.is_dir() and not partial.is_symlink() and _abandoned(partial, now):
            fd = try_lock(partial / LOCK_FILE)
            if fd is not None:
                yield partial, fd


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete abandoned, unlocked partial siblings of `out` (rules in the module docstring); returns them."""
    removed = []
    for partial, fd in _claim_stale(out):
        shutil.rmtree(partial, ignore_errors=True)
        os.close(fd)
        removed.append(partial)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def publish(tmp: Path, out: Path) -> None:
    """Make `tmp` durable (lock file removed, every file and directory fsynced), rename it to `out` (replacing
    what is there), and fsync the parent so the rename is durable too. Files written as `NAME.pending` (the
    ones that make a directory loadable, e.g. config.json) get their names only now, right before the rename,
    so a killed writer never leaves a partial directory that looks complete."""
    (tmp / LOCK_FILE).unlink(missing_ok=True)
    fsync_tree(tmp)
    for pending in tmp.glob(f"*{PENDING_SUFFIX}"):
        pending.rename(pending.with_name(pending.name.removesuffix(PENDING_SUFFIX)))
    fsync_dir(tmp)
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        _remove(old)
    else:
        tmp.rename(out)
    fsync_dir(out.parent)


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False, resume_key: str | None = None) -> Iterator[Path]:
    """Yield a locked partial directory that `publish` turns into `out` when the block exits cleanly.

    Without `resume_key` a failed block removes the partial directory. With it, the partial directory is
    kept on failure, and an abandoned one holding the same key is adopted (its files are what an earlier,
    interrupted run of the same work left), so the caller can skip what is done."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CheckpointError(f"{out}: output already exists (remove it or pass --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out)
    lock = None
    for partial, fd in _claim_stale(out):
        if lock is None and resume_key is not None and _resume_key(partial) == resume_key:
            partial.rename(tmp)  # the lock stays held: it is on the file, not the name
            lock = fd
            continue
        shutil.rmtree(partial, ignore_errors=True)
        os.close(fd)
    if lock is None:
        try:
            tmp.mkdir()
        except FileExistsError:
            raise CheckpointError(f"{tmp}: this process is already writing {out}") from None
        lock = try_lock(tmp / LOCK_FILE)
        if lock is None:
            raise CheckpointError(f"{tmp}: cannot lock the new partial directory (removed meanwhile?)")
    try:
        if resume_key is not None:
            (tmp / RESUME_FILE).write_text(resume_key)
        yield tmp
        (tmp / RESUME_FILE).unlink(missing_ok=True)
        publish(tmp, out)
    except BaseException:
        if resume_key is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _resume_key(partial: Path) -> str | None:
    try:
        return (partial / RESUME_FILE).read_text()
    except OSError:
        return None
