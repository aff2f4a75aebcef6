"""Reports: tables checked number by number against the records, every figure produced as a PNG."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from megatron_ext.eval.report import FIGURES, TRAINING_FIGURE, build_report
from megatron_ext.eval.store import Record, load_results, upsert
from megatron_ext.eval.tables import group_checkpoints, table1_merge_grid
from megatron_ext.eval.tensorboard import read_scalars

ROOT = Path(__file__).resolve().parents[1]
HIGHER = {
    "swebench": True,
    "mmlu_text": True,
    "fleurs": False,
    "librispeech": False,
    "llama_questions": True,
    "mmlu_audio": True,
}

# (checkpoint, labels, {benchmark: value}) shaped like the paper's grid and sweeps.
CHECKPOINTS = [
    ("devstral", {"role": "parent", "display": "Devstral 2 Small"}, {"swebench": 0.68, "mmlu_text": 0.798}),
    (
        "voxtral",
        {"role": "parent", "display": "Voxtral 24B"},
        {"mmlu_text": 0.74, "fleurs": 0.62, "librispeech": 0.015, "llama_questions": 0.713, "mmlu_audio": 0.743},
    ),
    (
        "linear-0.1",
        {"role": "merge", "method": "linear", "alpha": 0.1},
        {
            "swebench": 0.617,
            "mmlu_text": 0.806,
            "fleurs": 1.186,
            "librispeech": 1.795,
            "llama_questions": 0.67,
            "mmlu_audio": 0.383,
        },
    ),
    (
        "linear-0.5",
        {"role": "merge", "method": "linear", "alpha": 0.5},
        {"swebench": 0.30, "mmlu_text": 0.813, "fleurs": 0.905, "llama_questions": 0.73, "mmlu_audio": 0.763},
    ),
    (
        "della-a",
        {"role": "merge", "method": "della", "density": 0.35, "epsilon": 0.12, "lambda": 1.0},
        {"mmlu_text": 0.749, "fleurs": 1.166, "librispeech": 0.879, "llama_questions": 0.693, "mmlu_audio": 0.661},
    ),
]
SFT = {  # config -> (labels, {step: {benchmark: value}})
    "mix-80-20": (
        {"mixture": "80:20", "audio_epochs": 1.0, "base": "linear-0.1"},
        {
            50: {"swebench": 0.600, "mmlu_audio": 0.739, "llama_questions": 0.65},
            100: {"swebench": 0.576, "mmlu_audio": 0.750, "llama_questions": 0.66},
            150: {"swebench": 0.568, "mmlu_audio": 0.740, "llama_questions": 0.64},
        },
    ),
    "mix-95-5": (
        {"mixture": "95:5", "audio_epochs": 0.25, "base": "linear-0.1"},
        {50: {"swebench": 0.670, "mmlu_audio": 0.740}, 100: {"swebench": 0.650, "mmlu_audio": 0.750}},
    ),
    "a05-text": (
        {"mixture": "100:0", "audio_epochs": 0, "base": "linear-0.5"},
        {50: {"swebench": 0.40, "mmlu_audio": 0.7872, "mmlu_text": 0.80}},
    ),
}


def _records() -> list[Record]:
    out = []
    for name, labels, scores in CHECKPOINTS:
        out += [
            Record(name, b, "wer" if not HIGHER[b] else "accuracy", v, HIGHER[b], 10, dict(labels))
            for b, v in scores.items()
        ]
    for config, (labels, steps) in SFT.items():
        for step, scores in steps.items():
            out += [
                Record(
                    f"{config}@{step}",
                    b,
                    "accuracy",
                    v,
                    True,
                    10,
                    {**labels, "role": "sft", "config": config, "step": step},
                )
                for b, v in scores.items()
            ]
    return out


@pytest.fixture(scope="module")
def tensorboard_dir(tmp_path_factory) -> Path:
    """A real event file written by torch's SummaryWriter."""
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path_factory.mktemp("tb")
    writer = SummaryWriter(log_dir=str(root / "mix-80-20"))
    for step in range(1, 21):
        writer.add_scalar("train/lm_loss", 5.0 / step, step)
        writer.add_scalar("train/lr", 1e-6 * min(1.0, step / 10), step)
    writer.close()
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory, tensorboard_dir) -> tuple[Path, dict]:
    results = tmp_path_factory.mktemp("results")
    # records spread over two store files, as separate evaluate/ingest runs write them
    records = _records()
    for i, record in enumerate(records):
        upsert(results / ("merges.jsonl" if i % 2 else "sft.jsonl"), record)
    out = tmp_path_factory.mktemp("report")
    return out, build_report(results, out, [tensorboard_dir])


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _num(cell: str) -> float | None:
    return float(cell) if cell else None


def test_table1_numbers_are_the_records(report):
    out, _ = report
    rows = {r["checkpoint"]: r for r in _csv(out / "table1_merge_grid.csv")}
    assert set(rows) == {name for name, _, _ in CHECKPOINTS}  # parents and merges, no SFT checkpoints
    for name, _, scores in CHECKPOINTS:
        for bench in HIGHER:
            assert _num(rows[name][bench]) == scores.get(bench), (name, bench)
    md = (out / "table1_merge_grid.md").read_text()
    assert "| Linear (α=0.10) | 61.7 | 0.806 | 1.186 | 1.795 | 0.670 | 0.383 |" in md
    assert (
        "| DELLA (d=0.35, ε=0.12, λ=1.00) | not run | 0.749 |" in md
    )  # no SWE-Bench report: "not run", never a number
    assert md.index("Devstral 2 Small") < md.index("DELLA") < md.index("Linear (α=0.10)")


def test_sft_tables_take_the_best_checkpoint_per_config(report):
    out, _ = report
    for table in ("table2_sft_mixtures", "table3_sft_hyperparams"):
        rows = {r["config"]: r for r in _csv(out / f"{table}.csv")}
        assert set(rows) == set(SFT)
        for config, (_, steps) in SFT.items():
            for bench in ("swebench", "mmlu_audio"):
                scored = {s: v[bench] for s, v in steps.items() if bench in v}
                best_step = max(scored, key=scored.get)
                assert _num(rows[config][bench]) == scored[best_step]
                assert int(rows[config][f"{bench}_step"]) == best_step
    table3 = _csv(out / "table3_sft_hyperparams.csv")
    # alpha is inherited from the base merge of each config
    assert {r["config"]: float(r["alpha"]) for r in table3} == {"mix-80-20": 0.1, "mix-95-5": 0.1, "a05-text": 0.5}
    md = (out / "table3_sft_hyperparams.md").read_text()
    assert "**78.72**" in md and "**67.0**" in md  # best per column in bold
    assert "| mix-95-5 | 80:20" not in (out / "table2_sft_mixtures.md").read_text()
    assert "| mix-95-5 | 95:5 | 67.0 | 75.00 |" in (out / "table2_sft_mixtures.md").read_text()


def test_table4_final_vs_parents(report):
    out, _ = report
    rows = _csv(out / "table4_final_vs_parents.csv")
    assert [r["checkpoint"] for r in rows] == ["devstral", "voxtral", "linear-0.1", "mix-95-5@50"]
    final = rows[-1]  # highest SWE-Bench + MMLU Audio among SFT checkpoints: 0.670 + 0.740
    assert (_num(final["swebench"]), _num(final["mmlu_audio"])) == (0.670, 0.740)
    assert _num(rows[2]["mmlu_audio"]) == 0.383
    assert "| Voxtral 24B | not run | 74.30 | 74.0 | 71.3 |" in (out / "table4_final_vs_parents.md").read_text()


def test_super_parent_lists_checkpoints_above_every_parent(report):
    out, _ = report
    rows = {(r["checkpoint"], r["benchmark"]) for r in _csv(out / "super_parent.csv")}
    assert ("linear-0.1", "mmlu_text") in rows and ("linear-0.5", "mmlu_text") in rows  # > Devstral's 0.798
    assert ("a05-text@50", "mmlu_audio") in rows  # 78.72 > Voxtral's 74.3
    assert ("linear-0.1", "librispeech") not in rows  # WER: lower is better, 1.795 > 0.015
    assert ("mix-80-20@100", "mmlu_audio") in rows and ("mix-80-20@50", "mmlu_audio") not in rows


def test_every_figure_is_a_png(report):
    out, done = report
    assert done["skipped"] == ["merge_tradeoff.png"]  # the miniature's figure: these records have no tool calls
    drawn = [n for n in [*FIGURES, TRAINING_FIGURE] if n not in done["skipped"]]
    for name in drawn:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200, name
    index = (out / "REPORT.md").read_text()
    assert all(f"![{n}]({n})" in index for n in drawn)


def test_tensorboard_scalars_are_read_exactly(tensorboard_dir):
    runs = read_scalars(tensorboard_dir)
    assert list(runs) == ["mix-80-20"]
    loss = runs["mix-80-20"]["train/lm_loss"]
    assert [s for s, _ in loss] == list(range(1, 21))
    assert [v for _, v in loss] == pytest.approx([5.0 / s for s in range(1, 21)], rel=1e-6)  # stored as float32


def test_figures_without_data_are_skipped_not_drawn(tmp_path):
    upsert(tmp_path / "r.jsonl", Record("voxtral", "mmlu_audio", "accuracy", 0.5, True, 4, {"role": "parent"}))
    done = build_report(tmp_path, tmp_path / "out")
    assert set(done["skipped"]) == {
        "merge_tradeoff.png",
        "pareto_configs.png",
        "pareto_checkpoints.png",
        "mmlu_audio_recovery.png",
        "eval_curves.png",
        TRAINING_FIGURE,
    }
    assert (tmp_path / "out" / "parents_vs_merged.png").is_file()
    assert not (tmp_path / "out" / "pareto_configs.png").exists()


def test_upsert_replaces_by_checkpoint_and_benchmark(tmp_path):
    path = tmp_path / "r.jsonl"
    upsert(path, Record("a", "mmlu_text", "accuracy", 0.1, True))
    upsert(path, Record("a", "mmlu_audio", "accuracy", 0.2, True))
    upsert(path, Record("a", "mmlu_text", "accuracy", 0.3, True))
    assert sorted((r.benchmark, r.value) for r in load_results(path)) == [("mmlu_audio", 0.2), ("mmlu_text", 0.3)]
    assert len(path.read_text().splitlines()) == 2
    assert not list(tmp_path.glob(".*tmp"))


def test_report_cli_and_bad_store(tmp_path, capsys):
    import tools.report as cli

    (tmp_path / "bad.jsonl").write_text(json.dumps({"checkpoint": "x"}) + "\n")
    assert cli.main(["--results", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert (
        "bad.jsonl:1: not a result record (missing benchmark, metric, value, higher_is_better)"
        in capsys.readouterr().err
    )
    (tmp_path / "bad.jsonl").unlink()
    upsert(
        tmp_path / "ok.jsonl",
        Record(
            "linear-0.1", "swebench", "accuracy", 0.614, True, 500, {"role": "merge", "method": "linear", "alpha": 0.1}
        ),
    )
    assert cli.main(["--results", str(tmp_path), "--output", str(tmp_path / "out")]) == 0
    assert "| Linear (α=0.10) | 61.4 |" in (tmp_path / "out" / "table1_merge_grid.md").read_text()


def test_group_checkpoints_merges_labels_over_records():
    ckpts = group_checkpoints(_records())
    by_name = {c.name: c for c in ckpts}
    assert by_name["mix-80-20@100"].labels["alpha"] == 0.1 and by_name["mix-80-20@100"].step == 100
    assert table1_merge_grid(ckpts).rows[0][0] == "Devstral 2 Small"


def test_hyperparameter_and_judge_tables(tmp_path):
    """Hyperparameters come from the SFT config saved in checkpoint metadata; judge shares from judgment logs."""
    from megatron_ext.training.config import load_config, to_yaml

    cfg = load_config(ROOT / "examples/configs/tiny_cpu.yaml", ["optimizer.lr=1.0e-6", "training.seq_length=131072"])
    meta = {"tool": "sft", "extra": {"sft_config": to_yaml(cfg)}}
    for step in (10, 20):
        upsert(
            tmp_path / "r.jsonl",
            Record(
                f"run-95-5@{step}",
                "mmlu_audio",
                "accuracy",
                0.7,
                True,
                4,
                {"role": "sft", "step": step},
                provenance={"metadata": {"checkpoint_meta.json": meta}},
            ),
        )
    synth = tmp_path / "synth"
    synth.mkdir()
    decisions = ["DIRECT"] * 3 + ["REWRITE"] * 2 + ["NO"] * 5
    for shard in range(2):
        (synth / f"judgments-{shard:05d}-of-00002.jsonl").write_text(
            "".join(
                json.dumps({"row": i, "message": 1, "decision": d, "spoken_text": ""}) + "\n"
                for i, d in enumerate(decisions[shard::2])
            )
        )
    build_report(tmp_path, tmp_path / "out", synth=synth)
    (row,) = _csv(tmp_path / "out" / "table_hyperparameters.csv")
    assert row["config"] == "run-95-5" and float(row["optimizer.lr"]) == 1e-6
    assert int(row["training.seq_length"]) == 131072 and int(row["parallel.tensor_model_parallel_size"]) == 2
    shares = {
        r["decision"]: (int(r["messages"]), float(r["share"]))
        for r in _csv(tmp_path / "out" / "table_judge_statistics.csv")
    }
    assert shares == {"DIRECT": (3, 0.3), "REWRITE": (2, 0.2), "NO": (5, 0.5)}
    with pytest.raises(ValueError, match="no judgments"):
        build_report(tmp_path, tmp_path / "out", synth=tmp_path)
