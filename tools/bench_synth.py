#!/usr/bin/env python
"""Benchmark `tools/synth_audio.py` offline: rows/s with 1 and 2 worker processes and their ratio."""

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ext.data.synth.bench import bench_rows_per_s  # noqa: E402
from megatron_ext.data.synth.tts import OFFLINE_ENGINES  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", type=Path, default=Path("examples/data/coding_trajectories.jsonl"))
    p.add_argument("--workdir", type=Path, default=Path("build/bench-synth"), help="scratch directory (replaced)")
    p.add_argument("--copies", type=int, default=2, help="copies of the input to process per run")
    p.add_argument("--tts-engine", choices=OFFLINE_ENGINES, default="piper")
    p.add_argument("--workers", type=int, default=2, help="worker count compared with 1")
    a = p.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    one = bench_rows_per_s(a.input, a.workdir, 1, a.copies, a.tts_engine)
    many = bench_rows_per_s(a.input, a.workdir, a.workers, a.copies, a.tts_engine)
    print(f"engine={a.tts_engine} rows/run={sum(1 for _ in a.input.open()) * a.copies}")
    print(f"1 worker:  {one:.3f} rows/s")
    print(f"{a.workers} workers: {many:.3f} rows/s")
    print(f"speed-up:  {many / one:.2f}x (goal >= 1.8x for 2 workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
