"""Evaluate a whole merge grid plus its parents on every benchmark, then write the report (`make eval-grid`).

  eval_grid.py --manifest build/merge-grid/manifest.json --data DIR --output results/records.jsonl \\
      [--report report/] [--backend megatron|hf] [--dtype fp32|bf16] [--batch-size 8] [--max-new-tokens N]

DIR holds one JSONL per benchmark (BENCH.jsonl; `make eval-data` or tools/convert_benchmark.py write them).
Resumable: finished predictions are reused, a checkpoint whose predictions are all there is not loaded, and
an unchanged record is not rewritten. One line per checkpoint says whether its model was loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_ext.checkpoint.metadata import verification
from megatron_ext.cli._errors import error_policy
from megatron_ext.cli._verify import add_no_verify
from megatron_ext.eval.benchmarks import BENCHMARKS
from megatron_ext.eval.generation import DTYPES
from megatron_ext.eval.grid import GridSettings, evaluate_grid
from megatron_ext.eval.report import build_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Manifest, benchmark files, results store, report directory and the generation settings."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, required=True, help="manifest.json of `tools/merge.py --grid`")
    p.add_argument("--data", type=Path, required=True, help="directory of benchmark files BENCH.jsonl")
    p.add_argument("--output", type=Path, required=True, help="results JSONL (records upserted)")
    p.add_argument("--report", type=Path, help="write the report (tables, figures) of the results directory here")
    p.add_argument(
        "--benchmarks", default=",".join(BENCHMARKS), help=f"comma-separated subset (default: {','.join(BENCHMARKS)})"
    )
    p.add_argument("--backend", choices=("megatron", "hf"), default="megatron", help="in-process generator")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights and activations")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (megatron; run under torchrun)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    p.add_argument("--max-new-tokens", type=int, help="generation limit (default: 128 ASR, 64 QA, 16 MCQ)")
    add_no_verify(p)
    args = p.parse_args(argv)
    args.benchmarks = tuple(b for b in args.benchmarks.split(",") if b)
    unknown = [b for b in args.benchmarks if b not in BENCHMARKS]
    if unknown or not args.benchmarks:
        p.error(f"--benchmarks: unknown {unknown} (known: {', '.join(BENCHMARKS)})")
    if args.tp < 1 or args.batch_size < 1:
        p.error("--tp and --batch-size must be >= 1")
    return args


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-eval-grid: every checkpoint x benchmark into the store, one line per checkpoint, the report."""
    args = parse_args(argv)
    settings = GridSettings(args.backend, args.dtype, args.tp, args.batch_size, args.max_new_tokens)
    with verification(not args.no_verify):
        for entry, loaded in evaluate_grid(args.manifest, args.data, args.output, settings, args.benchmarks):
            how = "model loaded" if loaded else "every prediction resumed, model not loaded"
            print(f"{entry.name or entry.checkpoint.name}: {len(entry.benchmarks)} benchmarks ({how})", flush=True)
    if args.report:
        done = build_report(args.output.parent, args.report)
        print(f"report: {args.report / 'REPORT.md'} ({len(done['written'])} files)")
    return 0
