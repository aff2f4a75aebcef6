"""Throughput of the offline pipeline (rule judge + TTS engine) with 1 and N worker processes."""

import resource
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.data.synth.config import SynthConfig
from megatron_ext.data.synth.pipeline import run


@dataclass(frozen=True)
class BenchResult:
    """Wall-clock throughput, and the CPU seconds used (to see how much CPU a shared machine gave us)."""

    rows: int
    wall_s: float
    cpu_s: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s


SHARDS = 16  # many more shards than workers: workers balance uneven rows by taking shards, largest first


def _cpu_s() -> float:
    return sum(
        u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def bench_run(sample: Path, workdir: Path, workers: int, copies: int, engine: str) -> BenchResult:
    """One fresh run over `copies` concatenated copies of `sample`, in SHARDS shards whatever the worker count."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "input.jsonl"
    data.write_text(sample.read_text() * copies)
    cfg = SynthConfig(
        input=data,
        output=workdir / f"workers{workers}",
        workers=workers,
        num_shards=SHARDS,
        tts_engine=engine,
        concurrency=1,
        energon_prepare=False,
    )
    start, cpu = time.perf_counter(), _cpu_s()
    report = run(cfg)
    return BenchResult(report["rows_done"], time.perf_counter() - start, _cpu_s() - cpu)
