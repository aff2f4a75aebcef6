"""The `--shard-size-gb` flag of the tools that write safetensors (convert, merge)."""

from __future__ import annotations

from megatron_ext.checkpoint.atomic import CheckpointError


def shard_bytes(size_gb: float | None) -> int | None:
    """Bytes per output shard (None: the output format's default); a size that is not finite and > 0 is refused."""
    if size_gb is None:
        return None
    if not 0 < size_gb < float("inf"):
        raise CheckpointError(f"--shard-size-gb {size_gb}: expected a finite size > 0")
    return int(size_gb * 1024**3)
