#!/usr/bin/env python
"""Generation check on one GPU: bf16 greedy decoding (KV cache, TE spec) on a few full-width Mistral-Small
layers with the real 131k vocabulary; prints tokens/s per batch size and peak memory (code:
benchmarks/gen_gpu.py). Needs CUDA and Transformer Engine; elsewhere it exits with one error line.
"""

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ runs from the checkout
warnings.filterwarnings("ignore", module=r"megatron\.")

from benchmarks.gen_gpu import run_generation  # noqa: E402
from megatron_ext.cli._errors import error_policy  # noqa: E402


@error_policy
def main(argv: list[str] | None = None) -> int:
    """Time generation for each batch size and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="full-width decoder layers (default 4)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per row (default 512)")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per row (default 128)")
    args = parser.parse_args(argv)
    for r in run_generation(args.layers, tuple(args.batches), args.prompt_len, args.new_tokens):
        print(
            f"bf16 TE generation, {args.layers} layers + 131k vocab, batch {r.batch}: {r.new_tokens} new tokens "
            f"in {r.seconds:.2f}s = {r.tokens_per_second:.1f} tok/s, peak {r.peak_memory_gib:.1f} GiB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
