#!/usr/bin/env python
"""Throughput check on one GPU: full-width decoder layers on the Transformer Engine spec in BF16 and FP8.

Defaults are Mistral Small 3's layer (hidden 5120, 32/8 heads of 128, SwiGLU ffn 32768), 4 layers, sequence
8192, micro-batch 1. Prints model TFLOP/s (causal-attention FLOP convention, 3x forward for training),
tokens/s, step time and peak memory per precision. Goal on an H100: >= 500 TFLOP/s in FP8.
Needs CUDA and Transformer Engine (pip install -r requirements-gpu.txt); --flops-only works anywhere.
"""

import argparse
import sys
import warnings
from pathlib import Path

# benchmarks/ is a top-level package of the checkout, deliberately not installed with megatron_ext: the bench
# tools run from the repository and put its root on the path themselves.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", module=r"megatron\.")  # import-time notices

from benchmarks.gpu_check import LayerShape, layer_flops_per_token, run_check, training_flops_per_token  # noqa: E402,E501
from megatron_ext.cli._errors import error_policy  # noqa: E402


@error_policy
def main(argv: list[str] | None = None) -> int:
    """Print the FLOP model, then time each precision on the GPU (unless --flops-only)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = LayerShape()
    for name, default, text in (
        ("layers", d.layers, "decoder layers (the acceptance check uses 2-4)"),
        ("hidden", d.hidden, "hidden size"),
        ("heads", d.heads, "query heads"),
        ("kv-groups", d.kv_groups, "KV groups (GQA)"),
        ("head-dim", d.head_dim, "head dimension"),
        ("ffn", d.ffn, "SwiGLU ffn size"),
        ("seq", d.seq, "sequence length (>= 8192 for the acceptance check)"),
        ("micro-batch", d.micro_batch, "sequences per step"),
    ):
        parser.add_argument(f"--{name}", type=int, default=default, help=f"{text} (default {default})")
    parser.add_argument("--precision", choices=["bf16", "fp8", "both"], default="both", help="default: both")
    parser.add_argument(
        "--fp8-recipe",
        choices=["delayed", "tensorwise"],
        default="delayed",
        help="FP8 scaling: delayed, or tensorwise (current scaling); format hybrid (default delayed)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    parser.add_argument("--flops-only", action="store_true", help="print the FLOP model and exit (no GPU needed)")
    args = parser.parse_args(argv)
    shape = LayerShape(
        args.layers, args.hidden, args.heads, args.kv_groups, args.head_dim, args.ffn, args.seq, args.micro_batch
    )
    parts = layer_flops_per_token(shape)
    print(f"shape: {shape}")
    print("forward GFLOP/token/layer: " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in parts.items()))
    print(f"training GFLOP/token ({shape.layers} layers, causal): {training_flops_per_token(shape) / 1e9:.2f}")
    if args.flops_only:
        return 0
    for precision in ["bf16", "fp8"] if args.precision == "both" else [args.precision]:
        print(run_check(shape, precision, args.steps, args.warmup, args.fp8_recipe).line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
