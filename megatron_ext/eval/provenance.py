"""Checkpoint provenance for result records: the metadata files a checkpoint directory carries."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from megatron_ext.checkpoint.megatron_lm import resolve
from megatron_ext.checkpoint.metadata import META_FILE

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
    """Path plus every small JSON metadata file of the checkpoint (config, params, merge/training recipe; those
    of the iteration a Megatron-LM tracker names)."""
    path = Path(checkpoint).resolve()
    files = {}
    for file in sorted(resolve(path).glob("*.json")):
        if file.name in SKIP or file.name.endswith(".index.json") or file.stat().st_size > MAX_BYTES:
            continue
        try:
            files[file.name] = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # not metadata
    return {"path": str(path), "metadata": files}


def labels_from_provenance(provenance: dict) -> dict:
    """Report labels a checkpoint's own metadata implies.

    A merge recipe (`merge.json`, here or in the checkpoint this one was converted or fine-tuned from)
    gives method and parameters; SFT metadata (`checkpoint_meta.json`, tool "sft") gives role sft, the run
    name (config), its text:audio mixture, audio epochs and base (the checkpoint it started from).
    """
    labels = _merge_labels(Path(provenance["path"]))
    meta = provenance.get("metadata", {}).get(META_FILE)
    if isinstance(meta, dict) and meta.get("tool") == "sft":
        labels |= _sft_labels(meta)
    return labels


def _merge_labels(path: Path, depth: int = 3) -> dict:
    """Merge recipe labels of `path` or, following checkpoint_meta.json `sources`, of its ancestors."""
    path = resolve(path)
    merge_file = path / MERGE_FILE
    if merge_file.is_file():
        merge = json.loads(merge_file.read_text(encoding="utf-8"))
        params = merge.get("params", {})
        labels = {"role": "merge", "method": merge.get("method", params.get("method"))}
        return labels | {label: params[key] for key, label in MERGE_PARAM_LABELS.items() if key in params}
    meta_file = path / META_FILE
    if depth == 0 or not meta_file.is_file():
        return {}
    sources = json.loads(meta_file.read_text(encoding="utf-8")).get("sources") or []
    source = sources[0].get("path") if sources and isinstance(sources[0], dict) else None
    if not source:
        return {}
    source = Path(source) if Path(source).is_absolute() else Path.cwd() / source
    return _merge_labels(source if source.is_dir() else source.parent, depth - 1)  # a file source: its dir


def _sft_labels(meta: dict) -> dict:
    """Labels from the SFT run config saved in the checkpoint metadata (`extra.sft_config`, YAML)."""
    try:
        config = yaml.safe_load(meta.get("extra", {}).get("sft_config", "")) or {}
    except yaml.YAMLError:
        config = {}
    labels: dict = {"role": "sft"}
    if config.get("checkpoint", {}).get("save_dir"):
        labels["config"] = Path(config["checkpoint"]["save_dir"]).name
    if config.get("model", {}).get("checkpoint"):
        labels["base"] = Path(config["model"]["checkpoint"]).name
    sources = config.get("data", {}).get("sources") or []
    share = {
        m: sum(float(s.get("ratio", 0)) for s in sources if s.get("modality", "text") == m) for m in ("text", "audio")
    }
    if share["text"] + share["audio"] > 0:
        text = round(100 * share["text"] / (share["text"] + share["audio"]))
        labels["mixture"] = f"{text}:{100 - text}"
    audio_epochs = [s.get("epochs") for s in sources if s.get("modality") == "audio" and s.get("epochs") is not None]
    if audio_epochs:
        labels["audio_epochs"] = audio_epochs[0]
    return labels
