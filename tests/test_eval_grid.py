"""`make eval-grid`'s path end to end (tools/eval_grid.py's code): a 2-run merge grid of the tiny parents made
by the merge tool, a tiny benchmark set (MMLU text: every audio benchmark runs through the same runner in
test_eval_run.py), every checkpoint, the report; a rerun loads no model and rewrites nothing, and a rerun
after losing one prediction loads only that checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from megatron_ext.cli.eval_grid import main as eval_grid
from megatron_ext.cli.merge import main as merge
from megatron_ext.eval.benchmarks import BENCHMARKS
from megatron_ext.eval.grid import grid_entries
from megatron_ext.eval.store import load_results


@pytest.fixture(scope="module")
def manifest(tiny_dir, tmp_path_factory) -> Path:
    """The merge tool's grid (linear 0.1, SLERP 0.5) of the tiny parents: its manifest.json."""
    root = tmp_path_factory.mktemp("grid")
    grid = root / "grid.yaml"
    grid.write_text(
        "defaults: {seed: 0}\nruns:\n  - {name: lin, method: linear, alpha: 0.1}\n"
        "  - {name: sl, method: slerp, alpha: 0.5}\n"
    )
    parents = ["--devstral", str(tiny_dir / "devstral-hf"), "--voxtral", str(tiny_dir / "voxtral-hf")]
    assert (
        merge(
            [*parents, "--rope-from", "devstral", "--grid", str(grid), "--output", str(root / "out"), "--no-progress"]
        )
        == 0
    )
    return root / "out" / "manifest.json"


def _benchmark_set(data: Path) -> None:
    """One or two samples per benchmark; the spoken ones read a generated 1 s tone."""
    data.mkdir()
    sf.write(data / "tone.wav", 0.3 * np.sin(2 * np.pi * 330 * np.arange(16000) / 16000), 16000)
    mcq = {"question": "What is 7 times 8?", "choices": ["54", "56", "58", "64"], "answer": "B"}
    rows = {
        "fleurs": [{"id": "f0", "audio": "tone.wav", "text": "the cat sat"}],
        "librispeech": [{"id": "l0", "audio": "tone.wav", "text": "he hoped there would be stew"}],
        "llama_questions": [{"id": "q0", "audio": "tone.wav", "answers": ["Paris"]}],
        "mmlu_audio": [{"id": "a0", "audio": "tone.wav", **mcq}],
        "mmlu_text": [{"id": "t0", **mcq}, {"id": "t1", **mcq, "question": "What is 2 plus 2?", "answer": "A"}],
    }
    for bench, lines in rows.items():
        (data / f"{bench}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _stamps(results: Path) -> dict[str, int]:
    return {str(p.relative_to(results)): p.stat().st_mtime_ns for p in sorted(results.rglob("*.jsonl"))}


def test_eval_grid_resumes_without_loading_models(manifest, tmp_path, capsys):
    data, results, report = tmp_path / "data", tmp_path / "results", tmp_path / "report"
    _benchmark_set(data)
    argv = ["--manifest", str(manifest), "--data", str(data), "--output", str(results / "records.jsonl")]
    argv += ["--max-new-tokens", "3", "--benchmarks", "mmlu_text", "--report", str(report)]

    assert eval_grid(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    first = lines[:4]
    assert first == [
        "lin: 1 benchmarks (model loaded)",
        "sl: 1 benchmarks (model loaded)",
        "voxtral: 1 benchmarks (model loaded)",
        "devstral: 1 benchmarks (model loaded)",
    ]
    records = {(r.checkpoint, r.benchmark): r for r in load_results(results / "records.jsonl")}
    assert set(records) == {(c, "mmlu_text") for c in ("lin", "sl", "voxtral", "devstral")}
    assert records["lin", "mmlu_text"].labels == {"role": "merge", "method": "linear", "alpha": 0.1}
    assert records["sl", "mmlu_text"].labels == {"role": "merge", "method": "slerp", "alpha": 0.5}
    assert records["devstral", "mmlu_text"].labels == {"role": "parent"}
    table1 = (report / "table1_merge_grid.md").read_text()
    assert "REPORT.md" in lines[4] and "Linear (α=0.10)" in table1 and "SLERP (α=0.50)" in table1

    stored, stamps = (results / "records.jsonl").read_bytes(), _stamps(results)
    argv = argv[:-2]  # reruns without --report
    assert eval_grid(argv) == 0  # rerun: nothing to generate, no model built, no record rewritten
    lines = capsys.readouterr().out.splitlines()
    assert lines == [line.replace("(model loaded)", "(every prediction resumed, model not loaded)") for line in first]
    assert (results / "records.jsonl").read_bytes() == stored and _stamps(results) == stamps

    predictions = results / "predictions" / "sl.mmlu_text.jsonl"
    kept = predictions.read_text().splitlines()[:1]
    predictions.write_text(kept[0] + "\n")  # one sample of one benchmark of one checkpoint lost
    assert eval_grid(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.endswith("(model loaded)") for line in lines] == [False, True, False, False], lines
    assert (results / "records.jsonl").read_bytes() == stored  # the same prediction again: the same records
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert rows[0] == json.loads(kept[0]) and len(rows) == 2


def test_grid_entries_give_devstral_the_text_benchmarks_only(manifest):
    entries = grid_entries(manifest)
    assert [(e.checkpoint.name, e.name, e.labels["role"]) for e in entries] == [
        ("lin", None, "merge"),
        ("sl", None, "merge"),
        ("voxtral-hf", "voxtral", "parent"),
        ("devstral-hf", "devstral", "parent"),
    ]
    text_only = tuple(name for name, b in BENCHMARKS.items() if not b.needs_audio)
    assert "mmlu_text" in text_only and "fleurs" not in text_only
    assert [e.benchmarks for e in entries] == [tuple(BENCHMARKS)] * 3 + [text_only]


def test_bad_manifest_and_missing_benchmark_file_are_one_line(manifest, tmp_path, capsys):
    data = tmp_path / "data"
    _benchmark_set(data)
    (data / "fleurs.jsonl").unlink()
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps({"runs": [{"name": "x"}]}))
    for path, message in [(bad, "not a merge-grid manifest"), (manifest, "no fleurs.jsonl")]:
        out = tmp_path / "results" / "records.jsonl"
        assert eval_grid(["--manifest", str(path), "--data", str(data), "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
        assert not out.parent.exists()
