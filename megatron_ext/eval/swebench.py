"""SWE-Bench: ingest an external harness run into the results store (we never re-run SWE-Bench here).

Accepted input: the run report `swebench.harness.run_evaluation` writes (`{"resolved_ids": [...],
"total_instances": N, ...}`), tied to the checkpoint: the report must name the served model, either in a
`model_name_or_path` field or by its file name `MODEL.RUN_ID.json` as the harness writes it (`/` in the
model name as `__`), and that model must be the checkpoint's served name `NAME@FINGERPRINT12`
(`eval.identity.served_name`: `tools/serve.py`'s name; NAME is the record name or `--name`), optionally
behind a provider prefix (`openai/NAME@...`, as litellm-based agents write it). A report for another model,
for another checkpoint under the same name (other fingerprint), or naming none, is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from megatron_ext.eval.identity import checkpoint_fingerprint, served_name
from megatron_ext.eval.provenance import checkpoint_provenance, labels_from_provenance
from megatron_ext.eval.runner import file_sha256
from megatron_ext.eval.store import Record, checkpoint_identity, upsert

VERIFIED_SIZE = 500


def resolved_rate(report: dict, total: int | None, where: str) -> tuple[float, int, int]:
    """(fraction resolved, resolved count, instance count) of a harness report."""
    ids = report.get("resolved_ids")
    total = total or report.get("total_instances") or report.get("submitted_instances") or VERIFIED_SIZE
    if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise ValueError(f"{where}: expected 'resolved_ids' (a list of instance id strings)")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: duplicate instance ids in resolved_ids")
    if not isinstance(total, int) or total < len(ids) or total == 0:
        raise ValueError(f"{where}: instance count {total!r} is not an integer >= {len(ids)} resolved")
    return len(ids) / total, len(ids), total


def check_report_model(report: dict, path: Path, model: str) -> None:
    """Refuse a report that does not name the served `model` (its `model_name_or_path` field, else its file name)."""
    named = report.get("model_name_or_path")
    if named is None:
        harness_name = model.replace("/", "__")
        unprefixed = path.name.split("__", 1)[-1]  # `openai__NAME@FP.RUN.json` for model `openai/NAME@FP`
        if any(n.startswith(f"{harness_name}.") for n in (path.name, unprefixed)) and path.name.endswith(".json"):
            return
        raise ValueError(
            f"{path}: the report names no model (no model_name_or_path, file name not {harness_name}.RUN_ID.json); "
            f"expected a report for {model!r}"
        )
    for candidate in {str(named), str(named).replace("__", "/")}:
        if candidate == model or candidate.endswith(f"/{model}"):
            return
    name, _, fingerprint = model.rpartition("@")
    reported = str(named).replace("__", "/").rsplit("/", 1)[-1]
    if reported.rpartition("@")[0] == name:
        raise ValueError(
            f"{path}: report for {named!r}, another checkpoint named {name!r} (this one's fingerprint is {fingerprint})"
        )
    raise ValueError(f"{path}: report for model {named!r}, but the checkpoint is served as {model!r}")


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
    if not isinstance(report, dict):
        raise ValueError(f"{report_path}: expected a harness report object with resolved_ids and the model name")
    default_name, default_labels = checkpoint_identity(checkpoint)
    fingerprint = checkpoint_fingerprint(checkpoint)
    model = served_name(checkpoint, name)
    check_report_model(report, report_path, model)
    rate, resolved, instances = resolved_rate(report, total, str(report_path))
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
            "model": model,
            "checkpoint_sha256": fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    upsert(output, record)
    return record
