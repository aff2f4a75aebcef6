"""Convert checkpoints: HF / Mistral-native / Megatron torch_dist -> megatron (torch_dist), megatron-lm, hf or mistral.

The input format is detected and reported. Output is written to a hidden temporary directory next to
--output and renamed only when complete. torch_dist holds global tensors: one checkpoint loads at any
TP/PP the model allows; --tp/--pp are checked against the model and recorded. torch_dist outputs use
Megatron-LM's layout (OUT/release/ + OUT/latest_checkpointed_iteration.txt); a Megatron-LM checkpoint
without our checkpoint_meta.json is read when --rope-from and --tokenizer complete it. --lora DIR merges
the LoRA adapters of a LoRA SFT run into the weights (W + alpha/rank B A) on the way; --input must then be
the run's base checkpoint (model.checkpoint), checked against the fingerprint the adapters record.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Transparent huge pages for torch's large CPU tensors (read before torch allocates anything): fewer page
# faults while each tensor streams through a fresh buffer (~10% less system time).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from megatron_ext.checkpoint.metadata import verification  # noqa: E402  (no torch)
from megatron_ext.checkpoint.source_hashes import prefetch  # noqa: E402  (no torch)
from megatron_ext.cli._errors import error_policy
from megatron_ext.cli._shards import shard_bytes  # noqa: E402  (no torch)
from megatron_ext.cli._verify import add_no_verify  # noqa: E402


def _hash_sources_early(argv: list[str] | None) -> None:
    """A torch_dist output records its sources' sha256, the CPU-bound part of a cold conversion: start it
    before torch is imported (checked again, and waited for, by the conversion itself)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--input", type=Path)
    pre.add_argument("--to")
    pre.add_argument("--rehash", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.to in ("megatron", "megatron-lm") and known.input is not None and known.input.is_dir():
        prefetch(sorted(known.input.glob("*.safetensors")), reuse=not known.rehash)


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-convert: start hashing the sources, then parse arguments and convert."""
    _hash_sources_early(argv)
    from megatron_ext.checkpoint.convert import TARGETS, convert  # imports torch: after the hashing started

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input",
        type=Path,
        required=True,
        help="HF dir (model.safetensors or index + shards, config.json), Mistral-native dir "
        "(consolidated.safetensors + params.json) or Megatron torch_dist dir",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="output directory (must not exist unless --overwrite)"
    )
    parser.add_argument(
        "--to",
        choices=TARGETS,
        required=True,
        help="megatron: torch_dist + checkpoint_meta.json in Megatron-LM's release/ + tracker layout; megatron-lm: "
        "the same under Megatron-LM GPTModel keys (text-only models); hf: the model's HF layout (Voxtral, "
        "Mistral or Ministral3) with generation_config.json (+ Voxtral's preprocessor_config.json); mistral: "
        "consolidated.safetensors + params.json + tekken.json, what `vllm serve DIR --tokenizer-mode mistral "
        "--config-format mistral --load-format mistral` loads",
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to validate for (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate for (default 1)")
    parser.add_argument(
        "--rope-from",
        type=Path,
        default=None,
        help="HF config.json or params.json supplying rope settings for a torch_dist input whose metadata lacks "
        "them (and the attention geometry of a Megatron-LM checkpoint without checkpoint_meta.json)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tekken.json for a Megatron-LM checkpoint without checkpoint_meta.json (default: the input's own)",
    )
    parser.add_argument(
        "--shard-size-gb",
        type=float,
        default=None,
        help="split safetensors outputs into shards of at most this size with an index "
        "(default: 5 for hf; mistral: one consolidated.safetensors)",
    )
    parser.add_argument(
        "--lora",
        type=Path,
        default=None,
        help="merge these LoRA adapters into the weights: an SFT checkpoint's iter_*/lora directory (or the "
        "iter_* directory); --input must be the base checkpoint they were trained on",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--rehash",
        action="store_true",
        help="sha256 every source file afresh instead of reusing a known hash (HF hub blob "
        "name or the per-user cache in $MEGATRON_EXT_CACHE, default ~/.cache/megatron_ext)",
    )
    add_no_verify(parser)
    args = parser.parse_args(argv)
    with verification(not args.no_verify):
        report = convert(
            args.input,
            args.output,
            args.to,
            args.tp,
            args.pp,
            args.overwrite,
            args.rope_from,
            progress=not args.no_progress,
            rehash=args.rehash,
            shard_bytes=shard_bytes(args.shard_size_gb),
            tokenizer=args.tokenizer,
            lora=args.lora,
        )
    print(f"input: {report.input_description}")
    if report.already_complete:
        print(f"{report.output} already holds this conversion (same input files, verified): nothing to do")
        return 0
    print(
        f"output: {report.output} ({report.target}, {report.tensors} tensors, "
        f"{report.bytes_written / 1e9:.3f} GB in {report.seconds:.1f} s)"
    )
    return 0
