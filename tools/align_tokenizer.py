#!/usr/bin/env python
"""Align Voxtral's special tokens onto Devstral's tokenizer: writes OUTPUT/tekken.json + OUTPUT/tokenizer_map.json."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ext.tokenizer.align import AlignmentError, write_alignment  # noqa: E402


def _tekken(path: Path) -> Path:
    return path / "tekken.json" if path.is_dir() else path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devstral", type=Path, required=True, help="Devstral tekken.json or a directory holding it")
    parser.add_argument("--voxtral", type=Path, required=True, help="Voxtral tekken.json or a directory holding it")
    parser.add_argument("--output", type=Path, required=True, help="output directory")
    args = parser.parse_args()
    try:
        alignment = write_alignment(_tekken(args.devstral), _tekken(args.voxtral), args.output)
    except AlignmentError as exc:
        sys.exit(f"error: {exc}")
    moved = {
        r: m for r, m in alignment.voxtral_to_merged.items() if alignment.merged_specials[m] in alignment.voxtral_only
    }
    print(f"common specials: {len(alignment.common)}; Devstral-only: {', '.join(alignment.devstral_only) or '-'}")
    print(
        "Voxtral-only (old rank -> merged rank): "
        + ", ".join(f"{alignment.merged_specials[m]} {r}->{m}" for r, m in moved.items())
    )
    print(f"wrote {args.output / 'tekken.json'} and {args.output / 'tokenizer_map.json'} (rule: {alignment.rule})")


if __name__ == "__main__":
    main()
