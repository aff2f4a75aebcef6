"""`--no-verify`, shared by every tool that reads checkpoints: skip the sha256 check of their files on load."""

from __future__ import annotations

import argparse

NO_VERIFY_HELP = (
    "do not compare checkpoint files with the sha256 recorded in their metadata (sizes and headers are still "
    "checked); hashes of unchanged files are cached, so this only saves the first load's hashing"
)


def add_no_verify(parser: argparse.ArgumentParser) -> None:
    """Add the `--no-verify` flag (read back as `args.no_verify`)."""
    parser.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
