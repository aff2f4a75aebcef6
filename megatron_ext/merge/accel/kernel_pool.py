"""Parallel merge work as tasks of single-threaded torch kernels.

torch parallelizes each kernel with OpenMP: a fork/join per kernel whose threads spin while waiting,
taking the cores from the threads that read, hash and write (the merge ran 2x slower than its kernels
alone). Inside a `KernelPool` torch runs one thread per kernel and the pool runs one task per thread
it had on entry; reductions that must keep the bits of torch's own threading (mergekit's SLERP) get
that count as `threads` and split their sums as torch would (`threaded_sum`, `split_sum`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")
GRAIN = 32768  # at::internal::GRAIN_SIZE: torch splits a reduction across threads above this size


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
        """fn(*args) as a task of the pool."""
        assert self._pool is not None, "KernelPool used outside its `with` block"
        return self._pool.submit(fn, *args)

    def map(self, fn: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
        """fn over items in parallel; results in order."""
        return [f.result() for f in [self.submit(fn, x) for x in items]]


def threaded_sum(x: torch.Tensor, threads: int) -> torch.Tensor:
    """`x.sum()` of a 1-D tensor with the bits torch gives at `threads` intra-op threads, computed with
    single-threaded kernels (call it from a `KernelPool` task)."""
    return split_sum(x.numel(), threads, lambda s: x[s].sum())


def split_sum(n: int, threads: int, piece_sum: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """A sum over n elements split as torch splits it at `threads` threads, each piece summed by
    `piece_sum` (a 0-d tensor): at::parallel_for cuts the range into min(threads, ceil(n / GRAIN)) equal
    pieces summed into per-thread slots (zero-initialized, one per thread), then sums the slots."""
    if n < GRAIN or threads == 1:
        return piece_sum(slice(0, n))
    step = -(-n // min(threads, -(-n // GRAIN)))
    slots = [piece_sum(slice(i, i + step)) for i in range(0, n, step)]
    return torch.stack(slots + [torch.zeros((), dtype=slots[0].dtype)] * (threads - len(slots))).sum()
