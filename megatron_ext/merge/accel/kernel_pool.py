"""Parallel merge work as tasks of single-threaded torch kernels.

torch parallelizes each kernel with OpenMP: a fork/join per kernel whose threads spin while waiting,
taking the cores from the threads that read, hash and write (the merge ran 2x slower than its kernels
alone). Inside a `KernelPool` torch runs one thread per kernel and the pool runs one task per thread
it had on entry; reductions that must keep the bits of torch's own threading (mergekit's SLERP) get
that count as `threads`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class KernelPool:
    """One worker per intra-op thread torch had on entry; torch runs single-threaded until exit (the
    setting is process-wide, so nothing else should run kernels meanwhile expecting several threads)."""

    def __init__(self) -> None:
        self.threads = 0
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> KernelPool:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._pool = ThreadPoolExecutor(self.threads)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self.threads)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        assert self._pool is not None, "KernelPool used outside its `with` block"
        return self._pool.submit(fn, *args)

    def map(self, fn: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
        """fn over items in parallel; results in order."""
        return [f.result() for f in [self.submit(fn, x) for x in items]]
