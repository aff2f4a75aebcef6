"""Where a packer's documents come from: drawn from its mixture and encoded in this process, or drawn
`prefetch` documents ahead and encoded (chat template, audio decode, log-mel) by worker processes.

Both feeds hand the packer the same documents in the same order: a document is a pure function of its
reference, and the pool's results are taken in draw order. The feed's position is the mixture position
before the first document the packer has not taken, so documents encoded ahead but unused are drawn again
after a resume and the resume stays exact for any number of workers.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
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
    """Keeps `prefetch` documents in flight in a worker pool; `encode` (in-process) serves a resume's carry."""

    def __init__(
        self,
        mixture: Mixture,
        encode: Callable[[DocRef], EncodedDoc],
        submit: Callable[[DocRef], Future],
        prefetch: int,
    ) -> None:
        super().__init__(mixture, encode)
        self.submit, self.prefetch = submit, prefetch
        self.pending: deque[tuple[dict[str, Any], DocRef, Future]] = deque()  # (mixture state before it, ...)

    def _fill(self) -> None:
        while len(self.pending) < self.prefetch:
            before = self.mixture.state_dict()
            try:
                ref = next(self.mixture)
            except StopIteration:
                return
            self.pending.append((before, ref, self.submit(ref)))

    def __next__(self) -> tuple[DocRef, EncodedDoc]:
        self._fill()
        if not self.pending:
            raise StopIteration
        _, ref, result = self.pending.popleft()
        self._fill()
        return ref, result.result()  # a worker's SampleError / DataSourceError is raised here, message intact

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


def pool_submit(pool: ProcessPoolExecutor, stream: int) -> Callable[[DocRef], Future]:
    """Submit function of one stream's PoolFeed."""
    return lambda ref: pool.submit(_encode_job, stream, ref.source, ref.index)
