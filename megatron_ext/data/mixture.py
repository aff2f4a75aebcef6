"""Mixture of document sources with exact ratios, per-source epoch budgets and a shuffle buffer.

Sources are interleaved by smooth weighted round-robin, so after any n documents each source's share is
within one document of its ratio (sampling at random would drift by ~sqrt(n) documents). A source's
`epochs` caps how much of it the run may use (0.25 = a random quarter of it; None = cycle forever, with
a fresh permutation each epoch); an exhausted source leaves the mixture and the others keep their
relative ratios. The shuffle buffer then randomises the local order. The whole position is a handful of
integers and index references (`state_dict`), so a resumed run draws exactly the same documents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_ext.data.sources import Source


@dataclass(frozen=True)
class DocRef:
    """A document by position: which source, which index in it."""

    source: int
    index: int


class Mixture:
    """Endless (or budget-limited) stream of `DocRef`s over several sources."""

    def __init__(
        self, sources: list[Source], ratios: list[float], epochs: list[float | None], seed: int, shuffle_buffer: int = 0
    ) -> None:
        if not sources or not (len(sources) == len(ratios) == len(epochs)):
            raise ValueError("mixture needs one ratio and one epochs value per source")
        if any(r < 0 for r in ratios) or not any(r > 0 for r in ratios):
            raise ValueError(f"mixture ratios must be >= 0 with at least one > 0, got {ratios}")
        self.sources = sources
        self.ratios = np.asarray(ratios, dtype=np.float64) / float(sum(ratios))
        self.budgets = [
            None if e is None else max(1, math.floor(e * len(s))) for s, e in zip(sources, epochs, strict=True)
        ]
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.credits = np.zeros(len(sources))
        self.drawn = [0] * len(sources)  # documents taken from each source so far
        self.buffer: list[DocRef] = []
        self.rng = np.random.default_rng([seed, 0x5EED])
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    # ---- drawing ----
    def _active(self) -> np.ndarray:
        return np.array(
            [
                self.ratios[i] > 0 and (self.budgets[i] is None or self.drawn[i] < self.budgets[i])
                for i in range(len(self.sources))
            ]
        )

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perm_cache:
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != source}
            rng = np.random.default_rng([self.seed, source, epoch])
            self._perm_cache[key] = rng.permutation(len(self.sources[source]))
        return self._perm_cache[key]

    def _draw(self) -> DocRef | None:
        active = self._active()
        if not active.any():
            return None
        weights = np.where(active, self.ratios, 0.0)
        weights /= weights.sum()
        self.credits += weights
        self.credits[~active] = 0.0
        pick = int(np.argmax(np.where(active, self.credits, -np.inf)))
        self.credits[pick] -= 1.0
        n = len(self.sources[pick])
        epoch, pos = divmod(self.drawn[pick], n)
        self.drawn[pick] += 1
        return DocRef(pick, int(self._permutation(pick, epoch)[pos]))

    def __iter__(self) -> Mixture:
        return self

    def __next__(self) -> DocRef:
        """The next document; StopIteration once every source's budget is used up."""
        while len(self.buffer) < max(1, self.shuffle_buffer):
            ref = self._draw()
            if ref is None:
                break
            self.buffer.append(ref)
        if not self.buffer:
            raise StopIteration
        j = int(self.rng.integers(len(self.buffer))) if self.shuffle_buffer > 1 else 0
        return self.buffer.pop(j)

    def sample(self, ref: DocRef) -> dict[str, Any]:
        return self.sources[ref.source][ref.index]

    # ---- resumable position ----
    def state_dict(self) -> dict[str, Any]:
        return {
            "credits": self.credits.tolist(),
            "drawn": list(self.drawn),
            "buffer": [[r.source, r.index] for r in self.buffer],
            "rng": self.rng.bit_generator.state,
            "names": [s.name for s in self.sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [s.name for s in self.sources]
        if state["names"] != names:
            raise ValueError(f"data state is for sources {state['names']}, this run has {names}")
        self.credits = np.asarray(state["credits"], dtype=np.float64)
        self.drawn = list(state["drawn"])
        self.buffer = [DocRef(s, i) for s, i in state["buffer"]]
        self.rng.bit_generator.state = state["rng"]
