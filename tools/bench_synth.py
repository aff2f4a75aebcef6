#!/usr/bin/env python
"""Benchmark `tools/synth_audio.py` offline: rows/s with 1 and 2 worker processes and their ratio."""

import argparse
import shutil
import sys
from pathlib import Path

# benchmarks/ is a top-level package of the checkout, deliberately not installed with megatron_ext: the bench
# tools run from the repository and put its root on the path themselves.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synth import bench_run  # noqa: E402
from megatron_ext.audio.tts import OFFLINE_ENGINES  # noqa: E402
from megatron_ext.cli._errors import error_policy  # noqa: E402


@error_policy
def main(argv: list[str] | None = None) -> int:
    """Voice the input with 1 worker, then with --workers, and print both rates and the speed-up."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", type=Path, default=Path("examples/data/coding_trajectories.jsonl"))
    p.add_argument("--workdir", type=Path, default=Path("build/bench-synth"), help="scratch directory (replaced)")
    p.add_argument("--copies", type=int, default=4, help="copies of the input to process per run (4: 64 rows)")
    p.add_argument("--tts-engine", choices=OFFLINE_ENGINES, default="piper")
    p.add_argument("--workers", type=int, default=2, help="worker count compared with 1")
    a = p.parse_args(argv)
    shutil.rmtree(a.workdir, ignore_errors=True)
    one = bench_run(a.input, a.workdir, 1, a.copies, a.tts_engine)
    many = bench_run(a.input, a.workdir, a.workers, a.copies, a.tts_engine)
    print(f"engine={a.tts_engine} rows/run={one.rows}")
    for n, r in ((1, one), (a.workers, many)):
        print(
            f"{n} worker(s): {r.rows_per_s:.3f} rows/s ({r.wall_s:.1f} s wall, {r.cpu_s:.1f} CPU-s: "
            f"{r.cpu_s / r.wall_s:.2f} cores busy)"
        )
    print(f"speed-up: {many.rows_per_s / one.rows_per_s:.2f}x (goal >= 1.8x for 2 workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
