"""Per-phase wall times of a training step, and their spread over ranks (to spot stragglers).

Phases: `data` (waiting for the step's batches), `forward_backward` (micro-batches, gradient reduction and the
loss reduction), `optimizer` (optimizer and scheduler step), `validation`, `checkpoint` (the stop-signal
agreement and the save). `step` is the whole iteration measured on its own, so the phases can be checked to add
up to it. On GPU each boundary synchronises the device, so a phase is charged for its own kernels.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

PHASES = ("data", "forward_backward", "optimizer", "validation", "checkpoint")
SHORT = {"data": "data", "forward_backward": "fwd-bwd", "optimizer": "opt", "validation": "val", "checkpoint": "ckpt"}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimers:
    """Accumulates the phases of the current step; `end_step()` returns them with the step's total."""

    def __init__(self) -> None:
        self.times = dict.fromkeys(PHASES, 0.0)
        self.started = time.perf_counter()

    def start_step(self) -> None:
        _sync()
        self.times = dict.fromkeys(PHASES, 0.0)
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block as `name` (added to what the phase already holds this step)."""
        _sync()
        begin = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.times[name] += time.perf_counter() - begin

    def end_step(self) -> dict[str, float]:
        """This rank's seconds per phase and `step` (the whole iteration so far)."""
        _sync()
        return {**self.times, "step": time.perf_counter() - self.started}


def over_ranks(times: dict[str, float]) -> dict[str, float]:
    """Collective: each phase's and the step's maximum over all ranks, plus `step_spread` (max - min step)."""
    values = torch.tensor([times[p] for p in PHASES] + [times["step"], -times["step"]], dtype=torch.float64)
    if torch.cuda.is_available():
        values = values.cuda()
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    *phases, step_max, neg_step_min = values.cpu().tolist()
    return {**dict(zip(PHASES, phases, strict=True)), "step": step_max, "step_spread": step_max + neg_step_min}


def log_text(times: dict[str, float]) -> str:
    """The timer part of the step log line, e.g. `data 0.012s fwd-bwd 0.210s ... step 0.300s spread 0.004s`."""
    parts = [f"{SHORT[p]} {times[p]:.3f}s" for p in PHASES]
    return " ".join([*parts, f"step {times['step']:.3f}s", f"spread {times['step_spread']:.3f}s"])
