"""Align Voxtral's special tokens onto Devstral's tokenizer: writes OUTPUT/tekken.json + OUTPUT/tokenizer_map.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_ext.checkpoint.megatron_lm import resolve
from megatron_ext.cli._errors import error_policy
from megatron_ext.tokenizer.align import write_alignment


def _tekken(path: Path) -> Path:
    return resolve(path) / "tekken.json" if path.is_dir() else path


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-align-tokenizer: parse arguments, write the alignment, print a summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devstral", type=Path, required=True, help="Devstral tekken.json or a directory holding it")
    parser.add_argument("--voxtral", type=Path, required=True, help="Voxtral tekken.json or a directory holding it")
    parser.add_argument("--output", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)
    alignment = write_alignment(_tekken(args.devstral), _tekken(args.voxtral), args.output)
    moved = {
        r: m for r, m in alignment.voxtral_to_merged.items() if alignment.merged_specials[m] in alignment.voxtral_only
    }
    print(f"common specials: {len(alignment.common)}; Devstral-only: {', '.join(alignment.devstral_only) or '-'}")
    print(
        "Voxtral-only (old rank -> merged rank): "
        + ", ".join(f"{alignment.merged_specials[m]} {r}->{m}" for r, m in moved.items())
    )
    print(f"wrote {args.output / 'tekken.json'} and {args.output / 'tokenizer_map.json'} (rule: {alignment.rule})")
    return 0
