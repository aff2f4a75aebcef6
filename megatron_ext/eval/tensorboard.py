"""Scalar series from TensorBoard event files (training loss, learning rate, in-loop evals)."""

from __future__ import annotations

from pathlib import Path

EVENT_GLOB = "events.out.tfevents.*"


def read_scalars(root: str | Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{run: {tag: [(step, value), ...]}} for every directory under `root` holding event files.

    The run name is the directory relative to `root` ("." for root itself); steps are sorted and a
    step logged twice keeps its last value (as TensorBoard shows after a resumed run).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(root)
    runs: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for directory in sorted({p.parent for p in root.rglob(EVENT_GLOB)}):
        accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        accumulator.Reload()
        tags = accumulator.Tags().get("scalars", [])
        series = {}
        for tag in tags:
            by_step = {e.step: float(e.value) for e in accumulator.Scalars(tag)}
            series[tag] = sorted(by_step.items())
        if series:
            runs[str(directory.relative_to(root))] = series
    return runs
