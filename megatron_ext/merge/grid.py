"""A grid of merges (the paper's Table 1): one checkpoint per configuration plus a manifest.

Grid file (YAML): `defaults:` (parameters shared by all runs) and `runs:` (a list of {name, method,
alpha, density, epsilon, lambda, rescale_norm, seed, ...}); the parents, rope choice and output root
come from the command line. Finished configurations are skipped on a re-run.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import yaml

from megatron_ext.checkpoint.atomic import write_atomic
from megatron_ext.merge.methods import MergeParams
from megatron_ext.merge.run import MergeError, MergeJob, run_merge

# A run's output is OUTPUT/<name>: a plain directory name, so no run writes outside --output.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# YAML / CLI spelling -> MergeParams field.
PARAM_KEYS = {
    "method": "method",
    "alpha": "alpha",
    "density": "density",
    "epsilon": "epsilon",
    "lambda": "lam",
    "rescale_norm": "rescale",
    "seed": "seed",
    "mlp_density_boost": "mlp_density_boost",
    "early_layers": "early_layers",
    "early_lambda_scale": "early_lambda_scale",
}


def params_from_dict(data: dict[str, Any], where: str) -> MergeParams:
    unknown = set(data) - set(PARAM_KEYS) - {"name"}
    if unknown:
        raise MergeError(f"{where}: unknown keys {sorted(unknown)} (known: {', '.join(PARAM_KEYS)})")
    if "method" not in data:
        raise MergeError(f"{where}: no method")
    return MergeParams(**{PARAM_KEYS[k]: v for k, v in data.items() if k != "name"})


def load_grid(path: Path) -> list[tuple[str, MergeParams]]:
    """(name, parameters) per configuration; every configuration is validated before any merge runs."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MergeError(f"{path}: cannot read grid ({exc})") from None
    if not isinstance(data, dict):
        raise MergeError(f"{path}: expected a mapping with `defaults:` and `runs:`, got {type(data).__name__}")
    defaults, runs = data.get("defaults") or {}, data.get("runs") or []
    if not isinstance(defaults, dict) or not isinstance(runs, list):
        raise MergeError(f"{path}: `defaults` must be a mapping and `runs` a list")
    out, names = [], set()
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise MergeError(f"{path}: run {i} is not a mapping")
        name = run.get("name") or f"run{i}"
        if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
            raise MergeError(f"{path}: run name {name!r} is not a plain directory name ({RUN_NAME.pattern})")
        if name in names:
            raise MergeError(f"{path}: duplicate run name {name}")
        names.add(name)
        params = params_from_dict({**defaults, **run}, f"{path} run {name}")
        try:
            params.validate()
        except ValueError as exc:
            raise MergeError(f"{path} run {name}: {exc}") from None
        out.append((name, params))
    if not out:
        raise MergeError(f"{path}: no runs")
    return out


def run_grid(grid: Path, template: MergeJob) -> Path:
    """Run every configuration of `grid` with `template`'s parents/rope into template.output/<name>."""
    runs = load_grid(grid)
    root = Path(template.output)
    root.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "grid": str(grid),
        "devstral": str(template.devstral),
        "voxtral": str(template.voxtral),
        "base": str(template.base) if template.base else None,
        "runs": [],
    }
    for name, params in runs:
        job = dataclasses.replace(template, params=params, output=root / name)
        t0 = time.time()
        run_merge(job)
        provenance = json.loads((root / name / "merge.json").read_text())
        manifest["runs"].append(
            {
                "name": name,
                "output": str(root / name),
                "params": params.to_dict(),
                "plan_id": provenance["plan_id"],
                "seconds": round(time.time() - t0, 2),
            }
        )
        write_atomic(root / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return root / "manifest.json"
