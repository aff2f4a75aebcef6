"""Results store: JSONL files of records, one per (checkpoint, benchmark), each with its provenance.

A record file holds one JSON object per line; writing a record replaces the line with the same
(checkpoint, benchmark) key, through a temporary file renamed into place (never half-written).
Reports read every `*.jsonl` file directly inside a results directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_ext.checkpoint.atomic import write_atomic
from megatron_ext.errors import ProjectError

REQUIRED = ("checkpoint", "benchmark", "metric", "value", "higher_is_better")


class StoreError(ProjectError, ValueError):
    """A results file that cannot be read as records."""


@dataclass
class Record:
    """One benchmark score of one checkpoint.

    labels: what reports group by (role parent|merge|sft|final, method, alpha, config, mixture, step, ...).
    provenance: the checkpoint's own metadata (config, merge/training recipe) as found beside its weights.
    source: how the number was produced (data file and hash, predictions file, generator, time).
    """

    checkpoint: str
    benchmark: str
    metric: str
    value: float
    higher_is_better: bool
    n: int = 0
    labels: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return self.checkpoint, self.benchmark


def read_records(path: str | Path) -> list[Record]:
    """Records of one JSONL file; StoreError names the file and line of a bad one."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise StoreError(f"{path}:{number}: not JSON: {e.msg}") from e
        missing = [k for k in REQUIRED if not isinstance(data, dict) or k not in data]
        if missing:
            raise StoreError(f"{path}:{number}: not a result record (missing {', '.join(missing)})")
        known = {k: data[k] for k in Record.__dataclass_fields__ if k in data}
        records.append(Record(**known))
    return records


def load_results(path: str | Path) -> list[Record]:
    """All records of a results directory (its `*.jsonl` files) or of one file; later files win on a key."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such results file or directory")
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    merged: dict[tuple[str, str], Record] = {}
    for file in files:
        for record in read_records(file):
            merged[record.key] = record
    return list(merged.values())


def upsert(path: str | Path, record: Record) -> None:
    """Add `record` to a JSONL file, replacing any record with the same (checkpoint, benchmark); a stored
    record equal to it in all but its creation time is left as it is (a rerun rewrites nothing)."""
    path = Path(path)
    stored = read_records(path) if path.exists() else []
    if any(_unstamped(r) == _unstamped(record) for r in stored):
        return
    write_jsonl(path, [asdict(r) for r in [*(r for r in stored if r.key != record.key), record]])


def _unstamped(record: Record) -> dict:
    data = asdict(record)
    data["source"] = {k: v for k, v in data["source"].items() if k != "created"}
    return data


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSONL atomically (`checkpoint.atomic.write_atomic`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode())


def checkpoint_identity(checkpoint: str | Path) -> tuple[str, dict]:
    """Default record name and step label of a checkpoint directory (`run/iter_0000050` -> `run@50`)."""
    path = Path(checkpoint).resolve()
    match = re.fullmatch(r"iter_(\d+)", path.name)
    if match:
        return f"{path.parent.name}@{int(match.group(1))}", {"step": int(match.group(1))}
    return path.name, {}


def parse_labels(pairs: list[str]) -> dict:
    """`key=value` strings -> dict; numbers become numbers so reports can sort and plot them."""
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"label {pair!r} is not key=value")
        try:
            labels[key] = json.loads(value)
        except json.JSONDecodeError:
            labels[key] = value
    return labels
