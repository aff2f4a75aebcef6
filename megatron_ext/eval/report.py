"""Regenerate every table and figure from a results store into one directory, with an index (REPORT.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from megatron_ext.checkpoint.atomic import write_atomic
from megatron_ext.eval import figures
from megatron_ext.eval.store import load_results
from megatron_ext.eval.tables import TABLES, group_checkpoints, table_judge_statistics
from megatron_ext.eval.tensorboard import read_scalars

FIGURES = {
    "parents_vs_merged.png": figures.parents_vs_merged,
    "pareto_configs.png": figures.pareto_configs,
    "pareto_checkpoints.png": figures.pareto_checkpoints,
    "merge_tradeoff.png": figures.merge_tradeoff,
    "mmlu_audio_recovery.png": figures.mmlu_audio_recovery,
    "eval_curves.png": figures.eval_curves,
}
TRAINING_FIGURE = "training_curves.png"


def build_report(
    results: str | Path, output: str | Path, tensorboard: Sequence[str | Path] = (), synth: str | Path | None = None
) -> dict[str, list[str]]:
    """Write tables (Markdown + CSV), figures (PNG) and REPORT.md; returns {"written": [...], "skipped": [...]}.

    Training curves come from TensorBoard event files under `tensorboard` dirs (default: under `results`);
    with `synth` (a synth_audio.py output dir), its judgment logs give the judge-statistics table.
    A figure with nothing to plot is skipped and listed as such, never drawn empty.
    """
    records = load_results(results)
    if not records:
        raise ValueError(f"{results}: no result records")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    ckpts = group_checkpoints(records)
    written, skipped, sections = [], [], []
    for make in TABLES:
        table = make(ckpts)
        _write_text(output / f"{table.name}.md", table.markdown())
        _write_text(output / f"{table.name}.csv", table.csv())
        written += [f"{table.name}.md", f"{table.name}.csv"]
        sections.append(table.markdown())
    if synth is not None:
        table = table_judge_statistics(read_judgments(synth))
        _write_text(output / f"{table.name}.md", table.markdown())
        _write_text(output / f"{table.name}.csv", table.csv())
        written += [f"{table.name}.md", f"{table.name}.csv"]
        sections.append(table.markdown())
    for name, make in FIGURES.items():
        (written if make(ckpts, output / name) else skipped).append(name)
    runs = {}
    for root in tensorboard or [results]:
        root = Path(root).resolve()
        runs |= {
            f"{root.parent.name}/{root.name}" + ("" if run == "." else f"/{run}"): s
            for run, s in read_scalars(root).items()
        }
    (written if figures.training_curves(runs, output / TRAINING_FIGURE) else skipped).append(TRAINING_FIGURE)
    pngs = [n for n in written if n.endswith(".png")]
    index = ["# Evaluation report", "", f"{len(records)} records, {len(ckpts)} checkpoints, from `{results}`.", ""]
    index += sections + ["## Figures", ""] + [f"![{n}]({n})" for n in pngs]
    index += ([""] + [f"Skipped (nothing to plot): {', '.join(skipped)}"] if skipped else []) + [""]
    _write_text(output / "REPORT.md", "\n".join(index))
    return {"written": written + ["REPORT.md"], "skipped": skipped}


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


def read_judgments(synth: str | Path) -> list[dict]:
    """Every judgment line of a synth output directory (`judgments-*.jsonl`)."""
    files = sorted(Path(synth).glob("judgments-*.jsonl"))
    if not files:
        raise ValueError(f"{synth}: no judgments-*.jsonl (not a synth_audio.py output directory)")
    return [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
