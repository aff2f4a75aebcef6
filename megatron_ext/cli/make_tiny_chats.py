"""Write the small seeded SFT chat set for the tiny models: text.jsonl (tool-call chats) and audio.jsonl
(real speech from Debian pocketsphinx-testdata as OpenAI input_audio parts)."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_ext.cli._errors import error_policy
from megatron_ext.testing.tiny_chats import write_tiny_chats


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-make-tiny-chats: write the chat set, print the paths written."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, required=True, help="directory for text.jsonl and audio.jsonl")
    parser.add_argument("--text", type=int, default=200, help="number of text chats")
    parser.add_argument("--audio", type=int, default=40, help="number of spoken chats")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    args = parser.parse_args(argv)
    paths = write_tiny_chats(args.output, args.text, args.audio, args.seed)
    print(" ".join(str(p) for p in paths.values()))
    return 0
