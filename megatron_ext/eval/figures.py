"""The paper's figures as PNG (matplotlib, Agg backend): parents-vs-merged bars, SWE-Bench vs MMLU Audio
Pareto scatters (per config and per checkpoint, colored by merge alpha; typed vs spoken tool-call accuracy
for the miniature, whose records have no SWE-Bench), MMLU Audio recovery curves of
all SFT configs on one axis, eval curves per config, and training curves from TensorBoard logs.

Each function returns the written path, or None when the records hold nothing to plot.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_ext.eval.tables import SFT_ROLES, Checkpoint, best_by_config, final_comparison  # noqa: E402

DPI = 120
# Pareto axes (x benchmark, y benchmark, x label, y label), the first pair with points is drawn: the paper's
# coding vs audio scores, else the miniature's typed vs spoken tool calls.
PARETO_AXES = (
    ("swebench", "mmlu_audio", "SWE-Bench Verified (%)", "MMLU Audio (%)"),
    ("toolcall_typed", "toolcall_spoken", "Tool call, typed instruction (%)", "Tool call, spoken instruction (%)"),
)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def parents_vs_merged(ckpts: list[Checkpoint], path: Path) -> Path | None:
    """Grouped bars of SWE-Bench and MMLU Audio (%) for the parents, the base merge and the final model."""
    rows = [
        (t, c)
        for t, c in final_comparison(ckpts)
        if c.value("swebench") is not None or c.value("mmlu_audio") is not None
    ]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(1.9 * len(rows) + 2, 4))
    width = 0.38
    for k, (bench, label, color) in enumerate(
        (("swebench", "SWE-Bench", "#4C72B0"), ("mmlu_audio", "MMLU Audio", "#DD8452"))
    ):
        bars = [
            (i + (k - 0.5) * width, c.value(bench) * 100) for i, (_, c) in enumerate(rows) if c.value(bench) is not None
        ]
        ax.bar([x for x, _ in bars], [v for _, v in bars], width, color=color, label=label)
        for x, v in bars:
            ax.text(x, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [t for t, _ in rows], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Parents vs merged vs fine-tuned")
    ax.legend()
    return _save(fig, path)


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (x, y), both higher-is-better, sorted by x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def _scatter(
    points: list[tuple[float, float, float | None, str]], title: str, path: Path, labels: tuple[str, str]
) -> Path | None:
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    alphas = [a for _, _, a, _ in points if a is not None]
    norm = matplotlib.colors.Normalize(
        min(alphas, default=0), max(alphas, default=1) if len(set(alphas)) > 1 else min(alphas, default=0) + 1
    )
    cmap = plt.get_cmap("viridis")
    for x, y, a, label in points:
        ax.scatter(x, y, color=cmap(norm(a)) if a is not None else "grey", edgecolor="black", s=45, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = _pareto_front([(x, y) for x, y, _, _ in points])
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="red", label="Pareto front", zorder=2)
    if alphas:
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="merge α")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _alpha(labels: dict) -> float | None:
    try:
        return float(labels["alpha"])
    except (KeyError, TypeError, ValueError):
        return None


def pareto_configs(ckpts: list[Checkpoint], path: Path) -> Path | None:
    """One point per SFT config: its best SWE-Bench and best MMLU Audio, colored by the base merge's alpha."""
    for x, y, *labels in PARETO_AXES:
        points = [
            (e["best"][x][0] * 100, e["best"][y][0] * 100, _alpha(e["labels"]), config)
            for config, e in best_by_config(ckpts, [x, y]).items()
            if x in e["best"] and y in e["best"]
        ]
        if points:
            return _scatter(points, "SFT configurations (best checkpoint each)", path, tuple(labels))
    return None


def pareto_checkpoints(ckpts: list[Checkpoint], path: Path) -> Path | None:
    """Every checkpoint scored on both SWE-Bench and MMLU Audio (merges and SFT steps), colored by alpha."""
    for x, y, *labels in PARETO_AXES:
        points = [
            (c.value(x) * 100, c.value(y) * 100, _alpha(c.labels), c.display if c.role == "merge" else c.name)
            for c in ckpts
            if c.value(x) is not None and c.value(y) is not None
        ]
        if points:
            title = "SWE-Bench vs MMLU Audio" if x == "swebench" else "Typed vs spoken tool calls"
            return _scatter(points, f"{title}, all checkpoints", path, tuple(labels))
    return None


def _sft_series(ckpts: list[Checkpoint], benchmark: str) -> dict[str, list[tuple[int, float]]]:
    """Per SFT config: (step, value) points of one benchmark, with the base merge at step 0 when known."""
    by_name = {c.name: c for c in ckpts}
    series: dict[str, list[tuple[int, float]]] = {}
    for c in ckpts:
        if c.role in SFT_ROLES and c.step is not None and c.value(benchmark) is not None:
            points = series.setdefault(c.config, [])
            points.append((c.step, c.value(benchmark) * 100))
            base = by_name.get(str(c.labels.get("base")))
            if base is not None and base.value(benchmark) is not None and all(s != 0 for s, _ in points):
                points.append((0, base.value(benchmark) * 100))
    return {k: sorted(v) for k, v in series.items()}


def mmlu_audio_recovery(ckpts: list[Checkpoint], path: Path) -> Path | None:
    """MMLU Audio vs training step for every SFT config on one axis, with the audio parent as reference."""
    series = _sft_series(ckpts, "mmlu_audio")
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config, points in series.items():
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=config)
    for c in ckpts:
        if c.role == "parent" and c.value("mmlu_audio") is not None:
            ax.axhline(c.value("mmlu_audio") * 100, ls="--", color="grey", lw=1)
            ax.annotate(c.display, (0, c.value("mmlu_audio") * 100), fontsize=7, color="grey", va="bottom")
    ax.set_xlabel("training step")
    ax.set_ylabel("MMLU Audio (%)")
    ax.set_title("MMLU Audio recovery across SFT mixtures")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


EVAL_CURVE_BENCHMARKS = {"mmlu_audio": "MMLU Audio", "llama_questions": "LLaMA Q. S2T", "swebench": "SWE-Bench"}


def eval_curves(ckpts: list[Checkpoint], path: Path) -> Path | None:
    """Side-by-side panels, one per SFT config: MMLU Audio, LLaMA Q. S2T and SWE-Bench (%) vs step."""
    per_bench = {b: _sft_series(ckpts, b) for b in EVAL_CURVE_BENCHMARKS}
    configs = sorted({c for s in per_bench.values() for c in s})
    if not configs:
        return None
    fig, axes = plt.subplots(1, len(configs), figsize=(4.5 * len(configs), 3.8), squeeze=False, sharey=True)
    for ax, config in zip(axes[0], configs, strict=True):
        for bench, title in EVAL_CURVE_BENCHMARKS.items():
            points = per_bench[bench].get(config)
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=title)
        ax.set_title(config)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("score (%)")
    return _save(fig, path)


def training_curves(runs: dict[str, dict[str, list[tuple[int, float]]]], path: Path, max_tags: int = 4) -> Path | None:
    """One panel per scalar tag (loss tags first), one line per TensorBoard run."""
    tags = sorted({t for series in runs.values() for t in series}, key=lambda t: ("loss" not in t.lower(), t))[
        :max_tags
    ]
    if not tags:
        return None
    fig, axes = plt.subplots(1, len(tags), figsize=(4.5 * len(tags), 3.6), squeeze=False)
    for ax, tag in zip(axes[0], tags, strict=True):
        for run, series in runs.items():
            if tag in series:
                ax.plot([s for s, _ in series[tag]], [v for _, v in series[tag]], label=run)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def merge_tradeoff(ckpts: list[Checkpoint], path: Path) -> Path | None:
    """The merge grid's trade-off: typed tool-call accuracy vs transcription (100 - WER on LibriSpeech, floored
    at 0) for the parents and every merge, colored by alpha; drawn when both are scored (the miniature)."""
    points = [
        (100 * c.value("toolcall_typed"), 100 * max(0.0, 1 - c.value("librispeech")), _alpha(c.labels), c.display)
        for c in ckpts
        if c.role in ("parent", "merge") and None not in (c.value("toolcall_typed"), c.value("librispeech"))
    ]
    labels = ("Tool call, typed instruction (%)", "Transcription, 100 - WER (%)")
    return _scatter(points, "Merge grid: coding vs hearing", path, labels) if len(points) > 1 else None
