#!/usr/bin/env python
"""Benchmark checkpoint conversion on a synthetic >= 4 GB checkpoint with Mistral Small 3 tensor shapes.

Prints wall time, GB/s, peak RSS of the converter and the ratio to a disk floor measured in the same run
(read the inputs once + write the same bytes). The synthetic files are deleted afterwards unless --keep.
"""

import argparse
import sys
from pathlib import Path

# benchmarks/ is a top-level package of the checkout, deliberately not installed with megatron_ext: the bench
# tools run from the repository and put its root on the path themselves.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.convert import format_results, run_bench  # noqa: E402
from megatron_ext.cli._errors import error_policy  # noqa: E402


@error_policy
def main(argv: list[str] | None = None) -> int:
    """Generate the synthetic checkpoint, time the conversion and the disk floor, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("build/bench/convert"), help="scratch directory")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (2 -> ~4.9 GB in bf16)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic and converted checkpoints")
    args = parser.parse_args(argv)
    print(format_results(run_bench(args.workdir, args.layers, args.keep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
