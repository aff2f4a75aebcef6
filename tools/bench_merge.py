#!/usr/bin/env python
"""Benchmark our linear/SLERP/DELLA merges against mergekit and the disk floor on synthetic Mistral-Small-shaped
parents."""

import argparse
import json
import os
import sys
from pathlib import Path

# benchmarks/ is a top-level package of the checkout, deliberately not installed with megatron_ext: the bench
# tools run from the repository and put its root on the path themselves.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Transparent huge pages for torch's large CPU buffers: ~40x fewer page faults on multi-GB tensors.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from benchmarks.merge import METHODS, child, run_benchmark  # noqa: E402
from megatron_ext.cli._errors import error_policy  # noqa: E402


@error_policy
def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --child, one measured merge in this process) and print the results."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("build/bench/merge"), help="scratch directory (deleted afterwards)")
    p.add_argument("--layers", type=int, default=1, help="decoder layers of the main pair (1: ~3.8 GB per parent)")
    p.add_argument("--big-layers", type=int, default=2, help="layers of the second pair (peak-RSS flatness check)")
    p.add_argument("--keep", action="store_true", help="keep the generated parents")
    p.add_argument("--repeat", type=int, default=2, help="rounds of one run per kind; the fastest is reported")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.dir)))
        return 0
    methods = tuple(args.methods.split(","))
    if not set(methods) <= set(METHODS):
        p.error(f"--methods {args.methods}: expected a subset of {','.join(METHODS)}")
    tool = Path(__file__).resolve()
    results = run_benchmark(args.dir, args.layers, args.big_layers, tool, args.keep, args.repeat, methods)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
