#!/usr/bin/env python
"""A few SFT steps of the Transformer-Engine/FP8 path on a full-width slice of Devstral Audio (one GPU):
prints tokens/s, model TFLOP/s (causal convention) and peak memory. `--check` prints the plan on CPU.

`--per-rank-tp 4` runs instead what one rank of the TP=4 recipe holds (layer sliced by 4, 131072 packed
tokens, full recompute, chunked loss) in BF16 and FP8 (tensorwise), and projects the 128-GPU step;
`--cpu-dry-run` takes that path on CPU with tiny shapes."""

import argparse
import json
import sys
from pathlib import Path

# benchmarks/ is a top-level package of the checkout, deliberately not installed with megatron_ext: the bench
# tools run from the repository and put its root on the path themselves.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import sft_per_rank  # noqa: E402
from benchmarks.sft_gpu import plan, run  # noqa: E402
from megatron_ext.cli._errors import error_policy  # noqa: E402


@error_policy
def main(argv: list[str] | None = None) -> int:
    """Check the plan, then print it (--check) or run the measured steps and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--layers", type=int, default=None, help="decoder layers of the slice (default 4; 8 with --per-rank-tp)"
    )
    parser.add_argument("--encoder-layers", type=int, default=2, help="Whisper encoder layers (0: text only)")
    parser.add_argument(
        "--seq-length", type=int, default=None, help="packed tokens per step (default 16384; 131072 with --per-rank-tp)"
    )
    parser.add_argument("--docs", type=int, default=4, help="documents packed per sequence")
    parser.add_argument("--audio-chunks", type=int, default=1, help="30 s audio chunks in the first document")
    parser.add_argument("--steps", type=int, default=None, help="measured steps after --warmup (default 5; 3)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured first steps (default 2; 1)")
    parser.add_argument("--fp8", choices=["hybrid", "e4m3", "off"], default="hybrid", help="TE FP8 format")
    parser.add_argument("--recompute", choices=["full", "selective", "none"], default="none")
    parser.add_argument("--check", action="store_true", help="print the plan (FLOPs, loss memory) without a GPU")
    parser.add_argument(
        "--per-rank-tp",
        type=int,
        default=None,
        metavar="TP",
        help="one TP rank's shapes in BF16 and FP8 (tensorwise), full recompute, projected to --gpus "
        "(--encoder-layers, --audio-chunks, --fp8, --recompute do not apply)",
    )
    parser.add_argument("--gpus", type=int, default=128, help="GPUs of the projected run (--per-rank-tp)")
    parser.add_argument("--global-batch", type=int, default=32, help="sequences per step of the projected run")
    parser.add_argument("--cpu-dry-run", action="store_true", help="--per-rank-tp on CPU with tiny shapes")
    args = parser.parse_args(argv)
    if args.per_rank_tp is not None:
        return _per_rank(args)
    if args.cpu_dry_run:
        print("error: --cpu-dry-run needs --per-rank-tp", file=sys.stderr)
        return 2
    args.layers, args.seq_length = args.layers or 4, args.seq_length or 16384
    args.steps, args.warmup = args.steps or 5, 2 if args.warmup is None else args.warmup
    audio = args.audio_chunks if args.encoder_layers else 0
    if 375 * audio >= args.seq_length // args.docs:
        print(
            f"error: {audio} audio chunks need more than seq-length/docs = {args.seq_length // args.docs} tokens",
            file=sys.stderr,
        )
        return 2
    if args.check:
        print(json.dumps(plan(args.layers, args.encoder_layers, args.seq_length, args.docs, audio), indent=2))
        return 0
    result = run(
        args.layers,
        args.encoder_layers,
        args.seq_length,
        args.docs,
        audio,
        args.steps,
        args.warmup,
        None if args.fp8 == "off" else args.fp8,
        None if args.recompute == "none" else args.recompute,
    )
    print(json.dumps(result, indent=2))
    return 0


def _per_rank(args: argparse.Namespace) -> int:
    """The --per-rank-tp mode: plan (--check), CPU dry run or the measured GPU run, printed as JSON."""
    tp, layers = args.per_rank_tp, args.layers or 8
    seq, steps, warmup = args.seq_length or 131072, args.steps or 3, 1 if args.warmup is None else args.warmup
    dp = args.gpus // tp if tp >= 1 else 0
    if tp < 1 or args.gpus % tp or dp < 1 or args.global_batch % dp:
        print(
            f"error: --per-rank-tp {tp}: needs --gpus ({args.gpus}) divisible by it and --global-batch "
            f"({args.global_batch}) by the resulting data-parallel size",
            file=sys.stderr,
        )
        return 2
    if args.check:
        print(json.dumps(sft_per_rank.plan(tp, layers, seq, args.docs, args.gpus, tiny=args.cpu_dry_run), indent=2))
        return 0
    result = sft_per_rank.per_rank(
        tp, layers, seq, args.docs, steps, warmup, args.gpus, args.global_batch, cpu=args.cpu_dry_run
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
