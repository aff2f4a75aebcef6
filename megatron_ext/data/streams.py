"""Sequence streams: sequence j of every step is packed from stream j's own share of every source.

With one stream per sequence of a step (training.global_batch_size of them), a data-parallel rank opens,
encodes and packs only the streams of its own sequences, and the global batch does not depend on the
number of ranks. Stream j holds samples j, j + n, j + 2n, ... of each source (n streams) and has its own
mixture seed, so the streams are disjoint and independent: each one's position is a few integers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from megatron_ext.data.sources import DataSourceError, Source


class SourceShard:
    """Every `step`-th sample of `source` from `start` on: one stream's share of a source."""

    def __init__(self, source: Source, start: int, step: int) -> None:
        self.source, self.start, self.step = source, start, step
        self.name = source.name

    def __len__(self) -> int:
        return len(range(self.start, len(self.source), self.step))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[self.start + index * self.step]

    def where(self, index: int) -> str:
        return self.source.where(self.start + index * self.step)


def stream_shards(sources: list[Source], num_streams: int, streams: list[int]) -> dict[int, list[SourceShard]]:
    """Each listed stream's share of every source; refuses a stream that would get no sample at all."""
    largest = max(len(s) for s in sources)
    if largest < num_streams:
        raise DataSourceError(
            f"data.sources: the largest source has {largest} samples, fewer than the {num_streams} sequences "
            f"per step (training.global_batch_size): each sequence is packed from its own share of the sources"
        )
    return {j: [SourceShard(s, j, num_streams) for s in sources] for j in streams}


def stream_ratios(shards: list[SourceShard], ratios: list[float]) -> list[float]:
    """The mixture ratios of one stream: a source too small to reach this stream drops out of it."""
    return [r if len(s) else 0.0 for s, r in zip(shards, ratios, strict=True)]


def stream_seed(seed: int, stream: int) -> int:
    """Mixture seed of one stream, derived from the run's seed."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint32)[0])
