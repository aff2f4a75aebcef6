"""Write the tiny seeded parent models (Voxtral, Devstral, Devstral 2, Devstral 2507, base; HF and Mistral-native,
as published) and their Tekken tokenizers."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_ext.cli._errors import error_policy
from megatron_ext.testing.tiny_models import build_tiny_models


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-make-tiny-models: build the tiny models, print each directory's files and the manifest."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=Path("build/tiny"), help="output directory (replaced)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical bytes")
    args = parser.parse_args(argv)
    digests = build_tiny_models(args.output, args.seed)
    for name in sorted({p.split("/")[0] for p in digests}):
        files = sorted(p.split("/", 1)[1] for p in digests if p.startswith(name + "/"))
        print(f"{args.output / name}: {', '.join(files)}")
    print(f"manifest: {args.output / 'MANIFEST.json'} ({len(digests)} files, seed {args.seed})")
    return 0
