#!/usr/bin/env python
"""Benchmark checkpoint conversion on a synthetic >= 4 GB checkpoint with Mistral Small 3 tensor shapes.

Prints wall time, GB/s, peak RSS of the converter and the ratio to a disk floor measured in the same run
(read the inputs once + write the same bytes). The synthetic files are deleted afterwards unless --keep.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.convert import format_results, run_bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("build/bench/convert"), help="scratch directory")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (2 -> ~4.9 GB in bf16)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic and converted checkpoints")
    args = parser.parse_args()
    print(format_results(run_bench(args.workdir, args.layers, args.keep)))


if __name__ == "__main__":
    main()
