"""`training.profile_steps=[first, last]`: torch.profiler over those steps, one Chrome trace per rank.

The trace is `DIR/profile/rank-RRRRR.steps-FIRST-LAST.json` (DIR: checkpoint.save_dir, else
logging.tensorboard_dir), readable in Perfetto or chrome://tracing; each step is a `train_step N` span.
It is written under a hidden name and renamed, so a killed run leaves no half trace.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def trace_path(directory: Path, rank: int, steps: list[int]) -> Path:
    return directory / "profile" / f"rank-{rank:05d}.steps-{steps[0]}-{steps[1]}.json"


class StepProfiler:
    """Starts the profiler before step `first` and writes the trace after step `last` (no-op when unset)."""

    def __init__(self, steps: list[int] | None, directory: str | None, rank: int) -> None:
        self.steps = steps
        self.path = trace_path(Path(directory), rank, steps) if steps and directory else None
        self.prof: profile | None = None
        self.span: record_function | None = None

    def begin(self, step: int) -> None:
        if self.path is None or not self.steps[0] <= step <= self.steps[1]:
            return
        if self.prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities, record_shapes=True)
            self.prof.start()
        self.span = record_function(f"train_step {step}")
        self.span.__enter__()

    def end(self, step: int) -> None:
        self._end_span()
        if self.prof is not None and step >= self.steps[1]:
            self.close()

    def _end_span(self) -> None:
        if self.span is not None:
            self.span.__exit__(None, None, None)
            self.span = None

    def close(self) -> None:
        """Stop and write the trace (also when the run ends or stops inside the range)."""
        self._end_span()
        if self.prof is None:
            return
        self.prof.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self.prof.export_chrome_trace(str(tmp))
        os.replace(tmp, self.path)
        self.prof = None
