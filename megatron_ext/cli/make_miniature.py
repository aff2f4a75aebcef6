"""Build the miniature's trained parents (Voxtral-mini, Devstral-mini) from scratch on CPU, or reuse them.

Tokenizers trained on the toy tasks' texts, speech from the project's TTS, a common base decoder trained by
the SFT loop, then the two siblings fine-tuned from it; exported in the tiny stand-ins' HF layouts with the
held-out splits and MANIFEST.json (cache key, config, held-out scores, timings). A rerun whose code, config
and TTS versions hash to the same key reuses the output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_ext.cli._errors import error_policy
from megatron_ext.miniature.parents import MiniatureConfig, build_parents


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-make-miniature: build or reuse the parents, print their scores and timings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output", type=Path, default=Path("build/miniature/parents"), help="output directory (replaced)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the tasks, weights and data order")
    args = parser.parse_args(argv)
    manifest = build_parents(args.output, MiniatureConfig(seed=args.seed))
    print(json.dumps({"scores": manifest["scores"], "timings_s": manifest["timings_s"]}, indent=2))
    print(f"parents: {args.output}/{{voxtral-mini-hf,devstral-mini-hf}} (manifest {args.output / 'MANIFEST.json'})")
    return 0
