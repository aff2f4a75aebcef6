"""A checkpoint's identity for served models and external reports: its record name plus a content fingerprint.

The fingerprint is the sha256 of the sorted (file name, file sha256) pairs of the checkpoint's files: the
digests its metadata records (`checkpoint_meta.json` for a Megatron checkpoint, `merge.json` for an HF merge
output; loading checks the files against them) when it has them, else the files' own sha256 (hashed once,
cached: `checkpoint.source_hashes`). The served name `NAME@FINGERPRINT[:12]` (`tools/serve.py`'s, and the
one to give vLLM with `--served-model-name`) therefore ties a harness report naming it to one checkpoint:
two checkpoints under the same name differ in the suffix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megatron_ext.checkpoint.megatron_lm import resolve
from megatron_ext.checkpoint.metadata import META_FILE
from megatron_ext.checkpoint.source_hashes import source_sha256
from megatron_ext.eval.provenance import MERGE_FILE
from megatron_ext.eval.store import checkpoint_identity

FINGERPRINT_CHARS = 12


def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """Hex sha256 over the checkpoint's (file name, sha256) pairs, recorded ones preferred."""
    path = resolve(Path(checkpoint))
    digests = _recorded_digests(path)
    if digests is None:
        files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
        if not files:
            raise ValueError(f"{checkpoint}: no files to fingerprint (not a checkpoint directory)")
        digests = dict(zip([p.name for p in files], source_sha256(files), strict=True))
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def served_name(checkpoint: str | Path, name: str | None = None) -> str:
    """`NAME@FINGERPRINT12`: NAME is `name` or the checkpoint's record name (directory, or `run@step`)."""
    return f"{name or checkpoint_identity(checkpoint)[0]}@{checkpoint_fingerprint(checkpoint)[:FINGERPRINT_CHARS]}"


def _recorded_digests(path: Path) -> dict[str, str] | None:
    for meta in (META_FILE, MERGE_FILE):
        if (path / meta).is_file():
            recorded = json.loads((path / meta).read_text(encoding="utf-8")).get("sha256")
            if isinstance(recorded, dict) and recorded:
                return recorded
    return None
