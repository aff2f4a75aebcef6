#!/usr/bin/env python
"""Write the tiny seeded parent models (Voxtral, Devstral, Devstral-2, base) and their Tekken tokenizers."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ext.testing.tiny_models import build_tiny_models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=Path("build/tiny"), help="output directory (replaced)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical bytes")
    args = parser.parse_args()
    digests = build_tiny_models(args.output, args.seed)
    for name in sorted({p.split("/")[0] for p in digests}):
        files = sorted(p.split("/", 1)[1] for p in digests if p.startswith(name + "/"))
        print(f"{args.output / name}: {', '.join(files)}")
    print(f"manifest: {args.output / 'MANIFEST.json'} ({len(digests)} files, seed {args.seed})")


if __name__ == "__main__":
    main()
