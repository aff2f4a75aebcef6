"""Convert a benchmark from its published layout to the project's JSONL.

convert_benchmark.py librispeech --source LibriSpeech/test-clean --output data/librispeech.jsonl
convert_benchmark.py mmlu_text --source mmlu/data/test --output data/mmlu_text.jsonl
convert_benchmark.py fleurs --source fleurs/data/en_us --output data/fleurs.jsonl   (WAVs -> data/fleurs.jsonl.audio/)
convert_benchmark.py llama_questions --source LLAMA1-Test-Set --output data/llama_questions.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_ext.cli._errors import error_policy
from megatron_ext.eval.converters import CONVERTERS, convert_benchmark


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-convert-benchmark: read the published files, write the JSONL, print the sample count."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "benchmark", choices=CONVERTERS, help="; ".join(f"{k}: {v.source}" for k, v in CONVERTERS.items())
    )
    parser.add_argument("--source", type=Path, required=True, help="the published files (see the benchmark's help)")
    parser.add_argument("--output", type=Path, required=True, help="JSONL to write")
    args = parser.parse_args(argv)
    n = convert_benchmark(args.benchmark, args.source, args.output)
    print(f"{args.benchmark}: {n} samples -> {args.output}")
    return 0
