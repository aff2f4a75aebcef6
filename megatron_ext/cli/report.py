"""Regenerate all tables (Markdown + CSV) and figures (PNG) from a results store, plus REPORT.md.

  report.py --results DIR --output DIR [--tensorboard LOGDIR ...] [--synth DIR]

Tables: table1_merge_grid, table2_sft_mixtures, table3_sft_hyperparams, table4_final_vs_parents,
super_parent, table_hyperparameters (+ table_judge_statistics with --synth). Figures: parents_vs_merged,
pareto_configs, pareto_checkpoints, mmlu_audio_recovery, eval_curves, training_curves (TensorBoard
scalars; default: event files under --results).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_ext.cli._errors import error_policy
from megatron_ext.eval.report import build_report


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-report: build every table and figure, print where REPORT.md went."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, required=True, help="results directory (*.jsonl record files) or one file")
    p.add_argument("--output", type=Path, required=True, help="report directory (files are overwritten)")
    p.add_argument(
        "--tensorboard",
        type=Path,
        action="append",
        default=[],
        help="TensorBoard log directory for training curves (repeatable)",
    )
    p.add_argument("--synth", type=Path, help="synth_audio.py output directory: adds the judge-statistics table")
    args = p.parse_args(argv)
    done = build_report(args.results, args.output, args.tensorboard, args.synth)
    print(f"report: {args.output / 'REPORT.md'} ({len(done['written'])} files)")
    if done["skipped"]:
        print(f"skipped (nothing to plot): {', '.join(done['skipped'])}")
    return 0
