"""Checkpoint provenance for result records: the metadata files a checkpoint directory carries."""

from __future__ import annotations

import json
from pathlib import Path

SKIP = {"tekken.json"}  # the tokenizer is large and says nothing about the recipe
MAX_BYTES = 1024 * 1024
MERGE_FILE = "merge.json"  # written by tools/merge.py
MERGE_PARAM_LABELS = {
    "alpha": "alpha",
    "density": "density",
    "epsilon": "epsilon",
    "lam": "lambda",
    "rescale": "rescale",
}


def checkpoint_provenance(checkpoint: str | Path) -> dict:
    """Path plus every small JSON metadata file of the checkpoint (config, params, merge/training recipe)."""
    path = Path(checkpoint).resolve()
    files = {}
    for file in sorted(path.glob("*.json")):
        if file.name in SKIP or file.name.endswith(".index.json") or file.stat().st_size > MAX_BYTES:
            continue
        try:
            files[file.name] = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # not metadata
    return {"path": str(path), "metadata": files}


def labels_from_provenance(provenance: dict) -> dict:
    """Report labels a checkpoint's own metadata implies (a merge recipe -> role, method and its parameters)."""
    merge = provenance.get("metadata", {}).get(MERGE_FILE)
    if not isinstance(merge, dict):
        return {}
    params = merge.get("params", {})
    labels = {"role": "merge", "method": merge.get("method", params.get("method"))}
    labels |= {label: params[key] for key, label in MERGE_PARAM_LABELS.items() if key in params}
    return labels
