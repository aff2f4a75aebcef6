#!/usr/bin/env python
"""Write the small seeded SFT chat set for the tiny models: text.jsonl (tool-call chats) and audio.jsonl
(real speech from Debian pocketsphinx-testdata as OpenAI input_audio parts)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ext.testing.tiny_chats import write_tiny_chats  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, required=True, help="directory for text.jsonl and audio.jsonl")
    parser.add_argument("--text", type=int, default=200, help="number of text chats")
    parser.add_argument("--audio", type=int, default=40, help="number of spoken chats")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    args = parser.parse_args()
    try:
        paths = write_tiny_chats(args.output, args.text, args.audio, args.seed)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(" ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
