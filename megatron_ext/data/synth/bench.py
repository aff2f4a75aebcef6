"""Throughput of the offline pipeline (rule judge + TTS engine) with 1 and N worker processes."""

import time
from pathlib import Path

from megatron_ext.data.synth.config import SynthConfig
from megatron_ext.data.synth.pipeline import run


def bench_rows_per_s(sample: Path, workdir: Path, workers: int, copies: int, engine: str) -> float:
    """Rows/s of one fresh run over `copies` concatenated copies of `sample` (one shard per worker)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "input.jsonl"
    data.write_text(sample.read_text() * copies)
    cfg = SynthConfig(input=data, output=workdir / f"workers{workers}", workers=workers, num_shards=workers,
                      tts_engine=engine, concurrency=1, energon_prepare=False)
    start = time.perf_counter()
    report = run(cfg)
    elapsed = time.perf_counter() - start
    return report["rows_done"] / elapsed
