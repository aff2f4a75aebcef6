#!/usr/bin/env python
"""A few SFT steps of the Transformer-Engine/FP8 path on a full-width slice of Devstral Audio (one GPU):
prints tokens/s, model TFLOP/s (causal convention) and peak memory. `--check` prints the plan on CPU."""

import argparse
import json
import sys
from pathlib import Path

# benchmarks/ is a top-level package of the checkout, deliberately not installed with megatron_ext: the bench
# tools run from the repository and put its root on the path themselves.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sft_gpu import plan, run  # noqa: E402
from megatron_ext.cli._errors import error_policy  # noqa: E402


@error_policy
def main(argv: list[str] | None = None) -> int:
    """Check the plan, then print it (--check) or run the measured steps and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the slice (full model: 40)")
    parser.add_argument("--encoder-layers", type=int, default=2, help="Whisper encoder layers (0: text only)")
    parser.add_argument("--seq-length", type=int, default=16384, help="packed tokens per step")
    parser.add_argument("--docs", type=int, default=4, help="documents packed per sequence")
    parser.add_argument("--audio-chunks", type=int, default=1, help="30 s audio chunks in the first document")
    parser.add_argument("--steps", type=int, default=5, help="measured steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured first steps")
    parser.add_argument("--fp8", choices=["hybrid", "e4m3", "off"], default="hybrid", help="TE FP8 format")
    parser.add_argument("--recompute", choices=["full", "selective", "none"], default="none")
    parser.add_argument("--check", action="store_true", help="print the plan (FLOPs, loss memory) without a GPU")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
