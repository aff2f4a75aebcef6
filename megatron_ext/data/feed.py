"""Where a packer's documents come from: drawn from its mixture and encoded in this process, or drawn
`prefetch` documents ahead and encoded (chat template, audio decode, log-mel) by worker processes.

Both feeds hand the packer the same documents in the same order: a document is a pure function of its
reference, and the pool's results are taken in draw order. The feed's position is the mixture position
before the first document the packer has not taken, so documents encoded ahead but unused are drawn again
after a resume and the resume stays exact for any number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import torch

from megatron_ext.data.chat import ChatEncoder, EncodedDoc
from megatron_ext.data.mixture import DocRef, Mixture
from megatron_ext.data.sources import Source

Mel = Callable[[np.ndarray], torch.Tensor]


class DocEncoder:
    """Encodes documents by (stream, source, index) over each stream's sources; with `mel`, every audio chunk
    is replaced by its log-mel features, so only features cross a process boundary."""

    def __init__(self, streams: dict[int, list[Source]], encoder: ChatEncoder, mel: Mel | None) -> None:
        self.streams, self.encoder, self.mel = streams, encoder, mel

    def __call__(self, stream: int, source: int, index: int) -> EncodedDoc:
        src = self.streams[stream][source]
        doc = self.encoder.encode(src[index], src.name, src.where(index))
        if self.mel is not None and doc.audio_chunks:
            doc.mels = [self.mel(chunk).numpy() for chunk in doc.audio_chunks]
            doc.audio_chunks = []
        return doc

    def for_stream(self, stream: int) -> Callable[[DocRef], EncodedDoc]:
        """Encoder of one stream's document references (in this process)."""
        return lambda ref: self(stream, ref.source, ref.index)


class InlineFeed:
    """The next document of the mixture, encoded here when the packer asks for it."""

    def __init__(self, mixture: Mixture, encode: Callable[[DocRef], EncodedDoc]) -> None:
        self.mixture, self.encode = mixture, encode

    def __next__(self) -> tuple[DocRef, EncodedDoc]:
        ref = next(self.mixture)
        return ref, self.encode(ref)

    def state_dict(self) -> dict[str, Any]:
        return self.mixture.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixture.load_state_dict(state)


class PoolFeed(InlineFeed):
    """Keeps `prefetch` documents of stream `stream` in flight in `pool`; `encode` (in-process) serves a resume's
    carry."""

    def __init__(
        self,
        mixture: Mixture,
        encode: Callable[[DocRef], EncodedDoc],
        pool: ProcessPoolExecutor,
        stream: int,
        prefetch: int,
    ) -> None:
        super().__init__(mixture, encode)
        self.pool, self.stream, self.prefetch = pool, stream, prefetch
        self.pending: deque[tuple[dict[str, Any], DocRef, Future]] = deque()  # (mixture state before it, ...)

    def _fill(self) -> None:
        while len(self.pending) < self.prefetch:
            before = self.mixture.state_dict()
            try:
                ref = next(self.mixture)
            except StopIteration:
                return
            self.pending.append((before, ref, self.pool.submit(_encode_job, self.stream, ref.source, ref.index)))

    def __next__(self) -> tuple[DocRef, EncodedDoc]:
        self._fill()
        if not self.pending:
            raise StopIteration
        _, ref, result = self.pending.popleft()
        self._fill()
        return ref, _result(result, self.pool)  # a worker's SampleError / DataSourceError is raised here, intact

    def state_dict(self) -> dict[str, Any]:
        return self.pending[0][0] if self.pending else self.mixture.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending.clear()
        super().load_state_dict(state)


# ---- the worker pool: one per training process, shared by its streams ----------------------------------
_worker_encoder: Callable[[int, int, int], EncodedDoc] | None = None


def _init_worker(build: Callable[[], DocEncoder]) -> None:
    """Pool initializer: one intra-op thread (as torch's DataLoader workers), this worker's own sources, and
    Ctrl-C / SLURM's SIGUSR1 left to the training process (which stops the pool)."""
    global _worker_encoder
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)
    _worker_encoder = build()


def _encode_job(stream: int, source: int, index: int) -> EncodedDoc:
    return _worker_encoder(stream, source, index)


def start_pool(num_workers: int, build: Callable[[], DocEncoder]) -> ProcessPoolExecutor:
    """`num_workers` forked processes, each encoding with `build()` (sources re-opened in the worker: file
    handles are never shared across a fork). A worker that dies breaks the pool: the training process gets
    BrokenProcessPool instead of waiting forever."""
    return ProcessPoolExecutor(num_workers, multiprocessing.get_context("fork"), _init_worker, (build,))


def _result(future: Future, pool: ProcessPoolExecutor, poll_s: float = 1.0) -> EncodedDoc:
    """The future's result, or BrokenProcessPool once a worker has died (polled: `_processes` is CPython's
    worker table), even when the pool cannot notice it by itself (see `_unblock_manager`)."""
    while True:
        try:
            return future.result(timeout=poll_s)
        except TimeoutError:
            dead = [p.pid for p in list(pool._processes.values()) if p.exitcode is not None]
            if dead:
                _unblock_manager(pool)
                raise BrokenProcessPool(f"data worker(s) {dead} died (killed or out of memory)") from None


def _unblock_manager(pool: ProcessPoolExecutor, timeout_s: float = 30.0) -> None:
    """A worker killed while writing its result leaves a half-written message in the result pipe, and the
    pool's manager thread waits for the rest forever (so would shutdown and interpreter exit). Padding the pipe
    with zero bytes completes that message as garbage: the thread fails to unpickle it, marks the pool broken,
    stops the other workers and exits. Writes are PIPE_BUF-sized and only when the pipe has room (atomic, never
    blocking)."""
    thread = pool._executor_manager_thread
    fd = pool._result_queue._writer.fileno()
    waited = 0.0
    while thread is not None and thread.is_alive() and waited < timeout_s:
        if select.select([], [fd], [], 0)[1]:
            os.write(fd, bytes(select.PIPE_BUF))
        thread.join(0.05)
        waited += 0.05
