"""SWE-Bench: ingest an external harness run into the results store (we never re-run SWE-Bench here).

Accepted inputs: the run report `swebench.harness.run_evaluation` writes (`{"resolved_ids": [...],
"total_instances": N, ...}`), or a bare JSON list of resolved instance ids with the set size given
separately (500 for SWE-Bench Verified).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from megatron_ext.eval.provenance import checkpoint_provenance, labels_from_provenance
from megatron_ext.eval.runner import file_sha256
from megatron_ext.eval.store import Record, checkpoint_identity, upsert

VERIFIED_SIZE = 500


def resolved_rate(report: object, total: int | None, where: str) -> tuple[float, int, int]:
    """(fraction resolved, resolved count, instance count) of a harness report or id list."""
    if isinstance(report, dict):
        ids = report.get("resolved_ids")
        total = total or report.get("total_instances") or report.get("submitted_instances")
    else:
        ids, total = report, total or VERIFIED_SIZE
    if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise ValueError(f"{where}: expected 'resolved_ids' (a list of instance id strings)")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: duplicate instance ids in resolved_ids")
    if not isinstance(total, int) or total < len(ids) or total == 0:
        raise ValueError(f"{where}: instance count {total!r} is not an integer >= {len(ids)} resolved")
    return len(ids) / total, len(ids), total


def ingest_swebench(
    report_path: str | Path,
    checkpoint: str | Path,
    output: str | Path,
    *,
    name: str | None = None,
    labels: dict | None = None,
    total: int | None = None,
) -> Record:
    """Turn a SWE-Bench harness result file into a `swebench` record for `checkpoint` and upsert it."""
    report_path = Path(report_path)
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{report_path}: cannot read harness results: {e}") from e
    rate, resolved, instances = resolved_rate(report, total, str(report_path))
    default_name, default_labels = checkpoint_identity(checkpoint)
    provenance = checkpoint_provenance(checkpoint)
    record = Record(
        checkpoint=name or default_name,
        benchmark="swebench",
        metric="accuracy",
        value=rate,
        higher_is_better=True,
        n=instances,
        labels={**default_labels, **labels_from_provenance(provenance), **(labels or {})},
        provenance=provenance,
        source={
            "data": str(report_path.resolve()),
            "data_sha256": file_sha256(report_path),
            "resolved": resolved,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    upsert(output, record)
    return record
