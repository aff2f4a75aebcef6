#!/usr/bin/env python
"""Benchmark the SFT data loader: packed tokens/s per training process for text and audio samples, in-process
(the baseline) and with 1 and 2 worker processes, against the rate one data-parallel rank of the paper's run
needs."""

import argparse
import json
import shutil
import sys
from pathlib import Path

# benchmarks/ is a top-level package of the checkout, deliberately not installed with megatron_ext: the bench
# tools run from the repository and put its root on the path themselves.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.loader import (  # noqa: E402
    PAPER_DP_RANKS,
    PAPER_STEP_S,
    PAPER_TOKENS_PER_STEP,
    bench_loader,
    needed_tokens_per_s,
    prepare,
)
from megatron_ext.cli._errors import error_policy  # noqa: E402


@error_policy
def main(argv: list[str] | None = None) -> int:
    """Run every (modality, workers) case and print tokens/s, ratio to the in-process baseline, and margin."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", type=Path, default=Path("examples/data/coding_trajectories.jsonl"), help="text chats")
    p.add_argument("--workdir", type=Path, default=Path("build/bench-loader"), help="scratch directory (replaced)")
    p.add_argument("--copies", type=int, default=50, help="copies of each sample set in its source")
    p.add_argument("--seq-length", type=int, default=32768, help="packed sequence length (paper: 131072)")
    p.add_argument("--rows", type=int, default=3, help="timed sequences per case (after one warm-up sequence)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts compared with 0")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    for flag, value in (
        ("--copies", a.copies),
        ("--seq-length", a.seq_length),
        ("--rows", a.rows),
        *(("--workers", w) for w in a.workers),
    ):
        if value < 1:
            p.error(f"{flag}: must be >= 1, got {value}")
    torch.set_num_threads(1)  # as under torchrun (OMP_NUM_THREADS=1) and in the loader's workers
    shutil.rmtree(a.workdir, ignore_errors=True)
    paths = prepare(a.workdir, a.input, a.copies)
    needed = needed_tokens_per_s()
    print(
        f"needed per data-parallel rank (paper run): {PAPER_TOKENS_PER_STEP} tokens/step / {PAPER_DP_RANKS} DP "
        f"ranks / {PAPER_STEP_S:g} s = {needed:.0f} tokens/s; seq_length {a.seq_length}, {a.rows} sequences per case"
    )
    figures = {"needed_tokens_per_s": needed, "seq_length": a.seq_length, "cases": []}
    for modality in ("text", "audio"):
        base = None
        for workers in [0, *a.workers]:
            r = bench_loader(paths, modality, workers, a.seq_length, a.rows)
            base = base or r
            print(
                f"{modality:5s} {workers} worker(s): {r.tokens_per_s:7.0f} tokens/s = "
                f"{r.tokens_per_s / base.tokens_per_s:.2f}x in-process, margin {r.tokens_per_s / needed:.2f}x needed | "
                f"{r.tokens_per_cpu_s:7.0f} tokens per CPU-s (one core: {r.tokens_per_cpu_s / needed:.1f}x needed), "
                f"training process {r.main_cpu_s / r.cpu_s:4.0%} of it, "
                f"{r.cpu_s / r.wall_s:.2f} cores busy ({r.tokens} tokens in {r.wall_s:.1f} s)"
            )
            figures["cases"].append(
                {
                    "modality": modality,
                    "workers": workers,
                    "tokens": r.tokens,
                    "wall_s": r.wall_s,
                    "cpu_s": r.cpu_s,
                    "training_process_cpu_s": r.main_cpu_s,
                    "tokens_per_s": r.tokens_per_s,
                    "tokens_per_cpu_s": r.tokens_per_cpu_s,
                    "vs_in_process": r.tokens_per_s / base.tokens_per_s,
                    "margin": r.tokens_per_s / needed,
                    "margin_per_core": r.tokens_per_cpu_s / needed,
                }
            )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
