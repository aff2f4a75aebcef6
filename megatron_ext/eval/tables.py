"""The paper's tables from result records: Table 1 (merge grid), 2/3 (SFT ablations, best checkpoint per
config), 4 (final vs parents), plus the super-parent list of Section 7. Markdown for reading, CSV (raw
fractions, best-at steps) for checking.

Records are grouped by checkpoint; reports read these labels (from `--label` or the checkpoint's own
metadata): role (parent | merge | sft | final), display, method, alpha, density, epsilon, lambda, config,
mixture ("95:5"), audio_epochs, step, base (the merge checkpoint an SFT run started from).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field

import yaml

from megatron_ext.eval.store import Record

# benchmark -> (column title, higher is better); titles follow the paper.
TITLES = {
    "swebench": "SWE-Bench (%)",
    "mmlu_text": "MMLU Text",
    "fleurs": "FLEURS WER",
    "librispeech": "LibriSpeech WER",
    "llama_questions": "LLaMA Q. S2T",
    "mmlu_audio": "MMLU Audio",
    "toolcall_typed": "Tool call typed",
    "toolcall_spoken": "Tool call spoken",
}
TABLE1_BENCHMARKS = ["swebench", "mmlu_text", "fleurs", "librispeech", "llama_questions", "mmlu_audio"]
# The miniature's coding and spoken-instruction scores: a table gets their columns only when some checkpoint has one.
TOOLCALL_BENCHMARKS = ["toolcall_typed", "toolcall_spoken"]
METHOD_NAMES = {"linear": "Linear", "slerp": "SLERP", "della": "DELLA"}
SFT_ROLES = ("sft", "final")
DASH = "–"
NOT_RUN = "not run"  # SWE-Bench without an ingested harness report for that checkpoint


@dataclass
class Checkpoint:
    """All records of one checkpoint, with its labels (merged over its records)."""

    name: str
    labels: dict = field(default_factory=dict)
    records: dict[str, Record] = field(default_factory=dict)

    def value(self, benchmark: str) -> float | None:
        record = self.records.get(benchmark)
        return None if record is None else record.value

    @property
    def role(self) -> str:
        return str(self.labels.get("role", "other"))

    @property
    def config(self) -> str:
        return str(self.labels.get("config", self.name.split("@")[0]))

    @property
    def step(self) -> int | None:
        step = self.labels.get("step")
        return int(step) if step is not None else None

    @property
    def display(self) -> str:
        if "display" in self.labels:
            return str(self.labels["display"])
        method = self.labels.get("method")
        if self.role == "merge" and method:
            if method == "della":
                params = ", ".join(
                    f"{sym}={self.labels[k]:.2f}"
                    for k, sym in (("density", "d"), ("epsilon", "ε"), ("lambda", "λ"))
                    if k in self.labels
                )
            else:
                params = f"α={float(self.labels.get('alpha', 0)):.2f}"
            return f"{METHOD_NAMES.get(method, method)} ({params})"
        return self.name


def group_checkpoints(records: Iterable[Record]) -> list[Checkpoint]:
    """One Checkpoint per record name; an SFT checkpoint without `alpha` inherits it from its `base` merge."""
    by_name: dict[str, Checkpoint] = {}
    for record in records:
        ckpt = by_name.setdefault(record.checkpoint, Checkpoint(record.checkpoint))
        ckpt.labels.update(record.labels)
        ckpt.records[record.benchmark] = record
    for ckpt in by_name.values():
        base = by_name.get(str(ckpt.labels.get("base")))
        if "alpha" not in ckpt.labels and base is not None and "alpha" in base.labels:
            ckpt.labels["alpha"] = base.labels["alpha"]
    return sorted(by_name.values(), key=lambda c: (c.config, c.step if c.step is not None else -1, c.name))


def with_scored_toolcalls(benchmarks: list[str], ckpts: list[Checkpoint]) -> list[str]:
    """`benchmarks` plus the tool-call benchmarks some checkpoint was scored on."""
    return benchmarks + [b for b in TOOLCALL_BENCHMARKS if any(c.value(b) is not None for c in ckpts)]


def higher_is_better(benchmark: str) -> bool:
    return benchmark not in ("fleurs", "librispeech")


def fmt(benchmark: str, value: float | None, percent: bool) -> str:
    """Accuracies as percentages (1 decimal) or fractions (3 decimals); WER always as a fraction."""
    if value is None:
        return NOT_RUN if benchmark == "swebench" else DASH
    if percent and higher_is_better(benchmark):
        return f"{value * 100:.1f}" if benchmark != "mmlu_audio" else f"{value * 100:.2f}"
    if benchmark == "swebench":
        return f"{value * 100:.1f}"
    return f"{value:.3f}"


@dataclass
class Table:
    """A report table: Markdown cells for reading and raw CSV values (same rows) for checking."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    csv_header: list[str]
    csv_rows: list[list]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if not self.rows:
            return "\n".join(lines + ["(no records for this table)", ""])
        lines += ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines + ([""] + [self.note] if self.note else []) + [""])

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.csv_header)
        writer.writerows([["" if v is None else v for v in row] for row in self.csv_rows])
        return buf.getvalue()


def _arrow(benchmark: str) -> str:
    return "↑" if higher_is_better(benchmark) else "↓"


def table1_merge_grid(ckpts: list[Checkpoint]) -> Table:
    """Parents and every merge configuration on all six benchmarks (paper Table 1)."""
    order = {"della": 0, "linear": 1, "slerp": 2}
    rows = [c for c in ckpts if c.role == "parent"] + sorted(
        (c for c in ckpts if c.role == "merge"),
        key=lambda c: (order.get(str(c.labels.get("method")), 3), c.display),
    )
    benchmarks = with_scored_toolcalls(TABLE1_BENCHMARKS, ckpts)
    header = ["Checkpoint"] + [f"{TITLES[b]} {_arrow(b)}" for b in benchmarks]
    return Table(
        "table1_merge_grid",
        "Table 1: merge evaluation grid (WER lower is better; SWE-Bench in %)",
        header,
        [[c.display] + [fmt(b, c.value(b), percent=False) for b in benchmarks] for c in rows],
        ["checkpoint", "display", "role"] + benchmarks,
        [[c.name, c.display, c.role] + [c.value(b) for b in benchmarks] for c in rows],
    )


def best_by_config(ckpts: list[Checkpoint], benchmarks: list[str]) -> dict[str, dict]:
    """Per SFT config: labels of its checkpoints and, per benchmark, (best value, step it was reached at)."""
    configs: dict[str, dict] = {}
    for c in ckpts:
        if c.role not in SFT_ROLES:
            continue
        entry = configs.setdefault(c.config, {"labels": {}, "best": {}})
        entry["labels"].update({k: v for k, v in c.labels.items() if k != "step"})
        for b in benchmarks:
            v = c.value(b)
            if v is None:
                continue
            old = entry["best"].get(b)
            if old is None or (v > old[0] if higher_is_better(b) else v < old[0]):
                entry["best"][b] = (v, c.step)
    return configs


def _sft_table(ckpts, name, title, label_cols, benchmarks, bold: bool) -> Table:
    configs = best_by_config(ckpts, benchmarks)
    best_overall = {
        b: (max if higher_is_better(b) else min)(
            (e["best"][b][0] for e in configs.values() if b in e["best"]), default=None
        )
        for b in benchmarks
    }
    rows, csv_rows = [], []
    for config, entry in configs.items():
        cells = [config] + [str(entry["labels"].get(k, DASH)) for k, _ in label_cols]
        raw = [config] + [entry["labels"].get(k) for k, _ in label_cols]
        for b in benchmarks:
            value, step = entry["best"].get(b, (None, None))
            text = fmt(b, value, percent=True)
            cells.append(f"**{text}**" if bold and value is not None and value == best_overall[b] else text)
            raw += [value, step]
        rows.append(cells)
        csv_rows.append(raw)
    header = (
        ["Config"]
        + [t for _, t in label_cols]
        + [f"{TITLES[b]}{'' if b == 'swebench' else ' (%)'} {_arrow(b)}" for b in benchmarks]
    )
    csv_header = ["config"] + [k for k, _ in label_cols] + [x for b in benchmarks for x in (b, f"{b}_step")]
    note = "Best score over all checkpoints of each config (each column independently)."
    return Table(name, title, header, rows, csv_header, csv_rows, note + (" Best per column in bold." if bold else ""))


def table2_sft_mixtures(ckpts: list[Checkpoint]) -> Table:
    """SFT data-mixture ablations (paper Table 2): best checkpoint per config."""
    return _sft_table(
        ckpts,
        "table2_sft_mixtures",
        "Table 2: SFT data mixture ablations",
        [("mixture", "Text : Audio")],
        with_scored_toolcalls(["swebench", "mmlu_audio"], ckpts),
        bold=False,
    )


def table3_sft_hyperparams(ckpts: list[Checkpoint]) -> Table:
    """SFT hyperparameter experiments (paper Table 3): best score per config and column, best in bold."""
    return _sft_table(
        ckpts,
        "table3_sft_hyperparams",
        "Table 3: best scores across checkpoints per SFT config",
        [("alpha", "α"), ("audio_epochs", "Audio Epochs")],
        ["mmlu_audio", "swebench", "llama_questions", "mmlu_text"],
        bold=True,
    )


def select_final(ckpts: list[Checkpoint]) -> Checkpoint | None:
    """The checkpoint labelled role=final, else the SFT checkpoint with the highest SWE-Bench + MMLU Audio
    (those with a SWE-Bench score first; without any, the highest MMLU Audio, its SWE-Bench "not run");
    without MMLU Audio scores (the miniature), the highest typed + spoken tool-call accuracy."""
    finals = [c for c in ckpts if c.role == "final"]
    if finals:
        return finals[-1]
    scored = [c for c in ckpts if c.role == "sft" and c.value("mmlu_audio") is not None]
    if not scored:
        tool_scored = [c for c in ckpts if c.role == "sft" and None not in map(c.value, TOOLCALL_BENCHMARKS)]
        return max(tool_scored, key=lambda c: sum(map(c.value, TOOLCALL_BENCHMARKS)), default=None)
    return max(
        scored,
        key=lambda c: (c.value("swebench") is not None, (c.value("swebench") or 0.0) + c.value("mmlu_audio")),
        default=None,
    )


def base_merge(ckpts: list[Checkpoint], final: Checkpoint | None) -> Checkpoint | None:
    """The merge the final model was fine-tuned from (its `base` label), else the only merge there is."""
    by_name = {c.name: c for c in ckpts}
    if final is not None and str(final.labels.get("base")) in by_name:
        return by_name[str(final.labels["base"])]
    merges = [c for c in ckpts if c.role == "merge"]
    return merges[0] if len(merges) == 1 else None


TABLE4_BENCHMARKS = ["swebench", "mmlu_audio", "mmlu_text", "llama_questions"]


def final_comparison(ckpts: list[Checkpoint]) -> list[tuple[str, Checkpoint]]:
    """(row title, checkpoint) for Table 4 and the bar chart: parents, base merge, final model."""
    final = select_final(ckpts)
    rows = [(c.display, c) for c in ckpts if c.role == "parent"]
    base = base_merge(ckpts, final)
    if base is not None:
        rows.append((f"Merged: {base.display}", base))
    if final is not None:
        rows.append((f"+ SFT: {final.display}", final))
    return rows


def table4_final_vs_parents(ckpts: list[Checkpoint]) -> Table:
    """Final SFT model against the parents and its base merge (paper Table 4)."""
    rows = final_comparison(ckpts)
    benchmarks = with_scored_toolcalls(TABLE4_BENCHMARKS, ckpts)
    header = ["Model"] + [f"{TITLES[b]}{'' if b == 'swebench' else ' (%)'} {_arrow(b)}" for b in benchmarks]
    return Table(
        "table4_final_vs_parents",
        "Table 4: final model vs parents and base merge",
        header,
        [[title] + [fmt(b, c.value(b), percent=True) for b in benchmarks] for title, c in rows],
        ["row", "checkpoint"] + benchmarks,
        [[title, c.name] + [c.value(b) for b in benchmarks] for title, c in rows],
    )


def table_super_parent(ckpts: list[Checkpoint]) -> Table:
    """Section 7: checkpoints that beat every parent scored on a benchmark (e.g. MMLU Text above Devstral)."""
    parents = [c for c in ckpts if c.role == "parent"]
    rows, csv_rows = [], []
    for b in TABLE1_BENCHMARKS:
        scored = [(p.value(b), p) for p in parents if p.value(b) is not None]
        if not scored:
            continue
        better = higher_is_better(b)
        best_value, best_parent = (max if better else min)(scored, key=lambda t: t[0])
        for c in ckpts:
            v = c.value(b)
            if c.role != "parent" and v is not None and (v > best_value if better else v < best_value):
                rows.append(
                    [c.display, TITLES[b], fmt(b, v, True), f"{fmt(b, best_value, True)} ({best_parent.display})"]
                )
                csv_rows.append([c.name, b, v, best_parent.name, best_value])
    return Table(
        "super_parent",
        "Checkpoints above both parents (Section 7)",
        ["Checkpoint", "Benchmark", "Score", "Best parent"],
        rows,
        ["checkpoint", "benchmark", "value", "best_parent", "best_parent_value"],
        csv_rows,
    )


# (column title, dotted key in the SFT run config) for the hyperparameter table (paper tab:hyperparams).
HYPERPARAMETERS = [
    ("LR", "optimizer.lr"),
    ("min LR ratio", "optimizer.min_lr_ratio"),
    ("weight decay", "optimizer.weight_decay"),
    ("warmup", "optimizer.warmup_steps"),
    ("clip", "optimizer.clip_grad"),
    ("seq length", "training.seq_length"),
    ("global batch", "training.global_batch_size"),
    ("iters", "training.train_iters"),
    ("TP", "parallel.tensor_model_parallel_size"),
    ("CP", "parallel.context_parallel_size"),
    ("shuffle buffer", "data.shuffle_buffer"),
]


def _dotted(config: dict, key: str):
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def table_hyperparameters(ckpts: list[Checkpoint]) -> Table:
    """SFT hyperparameters per config, read from the run config saved in each checkpoint's metadata."""
    configs: dict[str, dict] = {}
    for c in ckpts:
        for record in c.records.values():
            meta = record.provenance.get("metadata", {}).get("checkpoint_meta.json", {})
            if c.role in SFT_ROLES and isinstance(meta, dict) and meta.get("tool") == "sft" and c.config not in configs:
                configs[c.config] = yaml.safe_load(meta.get("extra", {}).get("sft_config", "")) or {}
    values = {name: [_dotted(cfg, key) for _, key in HYPERPARAMETERS] for name, cfg in configs.items()}
    return Table(
        "table_hyperparameters",
        "SFT hyperparameters (from each run's saved config)",
        ["Config"] + [t for t, _ in HYPERPARAMETERS],
        [[name] + [DASH if v is None else str(v) for v in row] for name, row in values.items()],
        ["config"] + [k for _, k in HYPERPARAMETERS],
        [[name, *row] for name, row in values.items()],
    )


def table_judge_statistics(judgments: list[dict]) -> Table:
    """Share of user messages the synth judge classified DIRECT / REWRITE / NO (its judgment logs)."""
    counts = {d: sum(1 for j in judgments if j.get("decision") == d) for d in ("DIRECT", "REWRITE", "NO")}
    total = sum(counts.values())
    rows = [[d, str(n), f"{100 * n / total:.1f}"] for d, n in counts.items()] if total else []
    return Table(
        "table_judge_statistics",
        "Verbalizability judge decisions (synthetic audio data)",
        ["Decision", "Messages", "Share (%)"],
        rows,
        ["decision", "messages", "share"],
        [[d, n, n / total] for d, n in counts.items()] if total else [],
    )


TABLES = (
    table1_merge_grid,
    table2_sft_mixtures,
    table3_sft_hyperparams,
    table4_final_vs_parents,
    table_super_parent,
    table_hyperparameters,
)
