#!/usr/bin/env python
"""Context parallelism with audio on one GPU: every CP rank's encoder chunks and spliced embeddings of one packed
row, checked against CP=1 and against Transformer Engine's THD partition, with the encoder time per rank.

The ranks' sides run one after another in this process (NCCL refuses two ranks on one GPU, so Megatron-Core's
ring attention is not run here). Exit 1 when a rank differs from its CP=1 slice by more than --tol or TE
orders the positions differently. `--check` prints each rank's chunks without a model; `--cpu-dry-run` runs the
path with tiny shapes on CPU."""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")  # fp32 GEMMs stay fp32 in TE (set before CUDA starts)
# benchmarks/ is a top-level package of the checkout, not installed with megatron_ext (see sft_gpu_bench.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cp_gpu import plan, run  # noqa: E402
from megatron_ext.cli._errors import error_policy  # noqa: E402


@error_policy
def main(argv: list[str] | None = None) -> int:
    """Print the plan (--check) or run the per-rank embeddings and print their figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cp", type=int, default=2, help="context-parallel size emulated (default 2)")
    parser.add_argument("--seq-length", type=int, default=None, help="packed positions (default 131072; 4096 dry)")
    parser.add_argument("--docs", type=int, default=4, help="documents in the row (default 4)")
    parser.add_argument("--chunks", type=int, default=None, help="30 s audio chunks in the row (default 16; 3 dry)")
    parser.add_argument("--tol", type=float, default=1e-4, help="max-abs per rank vs CP=1 (fp32, TF32 off)")
    parser.add_argument("--check", action="store_true", help="print each rank's positions and chunks; no model")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU, local spec")
    args = parser.parse_args(argv)
    if args.cp < 1:
        print(f"error: --cp {args.cp}: must be >= 1", file=sys.stderr)
        return 2
    seq = args.seq_length or (4096 if args.cpu_dry_run else 131072)
    chunks = (3 if args.cpu_dry_run else 16) if args.chunks is None else args.chunks
    if args.check:
        print(json.dumps(plan(args.cp, seq, args.docs, chunks), indent=2))
        return 0
    result = run(args.cp, seq, args.docs, chunks, cpu=args.cpu_dry_run)
    print(json.dumps(result, indent=2))
    bad = [r["rank"] for r in result["ranks"] if r["max_abs_vs_cp1"] > args.tol or r["te_index_equal"] is False]
    if bad:
        print(
            f"error: CP ranks {bad} differ from their CP=1 slices (tol {args.tol}) or from TE's order", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
