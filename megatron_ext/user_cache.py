"""The per-user cache directory: `$MEGATRON_EXT_CACHE`, else `$XDG_CACHE_HOME/megatron_ext` (`~/.cache/...`).

It holds what is worth keeping between runs and safe to lose: source-file hashes of conversions, compiled
merge kernels. Imports nothing heavy."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MEGATRON_EXT_CACHE"


def cache_dir() -> Path:
    """This user's cache directory (not created here: writers create it when they first write)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatron_ext"
