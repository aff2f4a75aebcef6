"""Tool-call benchmark: the exact-match scorer on hand-written outputs in both Mistral spellings, prompts
with the tools (typed and spoken), bad benchmark lines, and a real merged model's output parsed back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_ext.audio.tts import EspeakTTS
from megatron_ext.eval.benchmarks import BenchmarkFormatError, get_benchmark, load_samples
from megatron_ext.eval.figures import merge_tradeoff, pareto_checkpoints
from megatron_ext.eval.prompts import build_prompt, load_tokenizer
from megatron_ext.eval.store import Record
from megatron_ext.eval.tables import (
    final_comparison,
    group_checkpoints,
    table1_merge_grid,
    table4_final_vs_parents,
)
from megatron_ext.eval.toolcall import ToolCall, parse_tool_call, score_tool_call
from megatron_ext.eval.voice import voice_benchmark

ROOT = Path(__file__).resolve().parents[1]
TYPED = ROOT / "examples" / "eval" / "toolcall_text.jsonl"
ANSWER = {"name": "rename_symbol", "arguments": {"old": "load_user", "new": "fetch_user"}}
V11 = '[TOOL_CALLS]rename_symbol[ARGS]{"old": "load_user", "new": "fetch_user"}</s>'


@pytest.mark.parametrize(
    "prediction",
    [
        V11,
        '[TOOL_CALLS]rename_symbol[CALL_ID]a1b2c3d4e[ARGS]{"new": "fetch_user", "old": "load_user"}',
        '[TOOL_CALLS][{"name": "rename_symbol", "arguments": {"old": "load_user", "new": "fetch_user"}}]</s>',
        "[TOOL_CALLS]" + json.dumps([{"name": "rename_symbol", "arguments": json.dumps(ANSWER["arguments"])}]),
        "Sure. " + V11 + "[TOOL_CALLS]delete_file[ARGS]{}",  # only the first call counts
    ],
)
def test_right_call_scores_one(prediction):
    assert score_tool_call(prediction, ANSWER) == {"parsed": True, "name_correct": True, "correct": True}


@pytest.mark.parametrize(
    "prediction",
    [
        '[TOOL_CALLS]rename_symbol[ARGS]{"old": "load_user", "new": "fetch_users"}',  # wrong value
        '[TOOL_CALLS]rename_symbol[ARGS]{"old": "load_user"}',  # missing argument
        '[TOOL_CALLS]rename_symbol[ARGS]{"old": "load_user", "new": "fetch_user", "force": "yes"}',  # extra one
    ],
)
def test_wrong_argument_scores_zero_but_names_the_function(prediction):
    assert score_tool_call(prediction, ANSWER) == {"parsed": True, "name_correct": True, "correct": False}


def test_wrong_function_scores_zero():
    wrong = '[TOOL_CALLS]read_file[ARGS]{"old": "load_user", "new": "fetch_user"}'
    assert score_tool_call(wrong, ANSWER) == {"parsed": True, "name_correct": False, "correct": False}


@pytest.mark.parametrize(
    "prediction",
    [
        "",
        'rename_symbol{"old": "load_user", "new": "fetch_user"}',  # the control tokens decoded away
        '[TOOL_CALLS]rename_symbol[ARGS]{"old": "load_user", "new": "fet',  # cut by the token limit
        "[TOOL_CALLS][ARGS]{}",  # no name
        '[TOOL_CALLS]rename_symbol[ARGS]["load_user", "fetch_user"]',  # arguments not an object
        "[TOOL_CALLS][]",
        '[TOOL_CALLS]{"name": "rename_symbol"}',
    ],
)
def test_malformed_output_scores_zero(prediction):
    assert score_tool_call(prediction, ANSWER) == {"parsed": False, "name_correct": False, "correct": False}
    assert parse_tool_call(prediction) is None


def test_parse_returns_name_and_arguments():
    assert parse_tool_call(V11) == ToolCall("rename_symbol", {"old": "load_user", "new": "fetch_user"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tools": []}, "field 'tools' must be a non-empty list"),
        ({"answer": {"name": "read_file"}}, "field 'answer' must be"),
        ({"answer": {"name": "read_file", "arguments": "not json"}}, "field 'answer' must be"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, change, message):
    row = json.loads(TYPED.read_text().splitlines()[0]) | change
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(BenchmarkFormatError, match=f"{path}:1: {message}"):
        load_samples(get_benchmark("toolcall_typed"), path)
    del row["instruction"]
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(BenchmarkFormatError, match="missing field 'instruction'"):
        load_samples(get_benchmark("toolcall_typed"), path)


def test_prompts_carry_the_tools_and_the_spoken_one_no_text(tiny_dir, tmp_path):
    """Typed: [AVAILABLE_TOOLS] then the written instruction; spoken: the same tools, the instruction as
    [AUDIO] tokens only (voiced by the data pipeline's TTS)."""
    tokenizer = load_tokenizer(tiny_dir / "voxtral-hf")
    typed_bench, spoken_bench = get_benchmark("toolcall_typed"), get_benchmark("toolcall_spoken")
    typed = load_samples(typed_bench, TYPED)[0]
    text = tokenizer.decode(build_prompt(tokenizer, typed_bench, typed).tokens)
    assert text.index('"name": "read_file"') < text.index(typed.fields["instruction"])
    spoken_file = tmp_path / "toolcall_spoken.jsonl"
    assert voice_benchmark("toolcall_spoken", TYPED, spoken_file, EspeakTTS()) == 4
    spoken = load_samples(spoken_bench, spoken_file)[0]
    prompt = build_prompt(tokenizer, spoken_bench, spoken)
    text = tokenizer.decode(prompt.tokens)
    assert '"name": "rename_symbol"' in text and spoken.fields["instruction"] not in text
    assert prompt.tokens.count(24) == 375 and len(prompt.audio) == 1  # one 30 s chunk of [AUDIO]


def test_report_gets_tool_call_columns_and_pareto_only_when_scored(tmp_path):
    """Tool-call records add their columns to Tables 1, 2 and 4 and give the typed-vs-spoken Pareto figure;
    records without them leave the tables as they were."""
    plain = [Record("voxtral", "mmlu_audio", "accuracy", 0.5, True, 4, {"role": "parent"})]
    scores = {"devstral": (0.95, 0.1, "parent"), "voxtral": (0.05, 0.02, "parent"), "linear-0.3": (0.7, 0.2, "merge")}
    scored = plain + [
        Record(name, bench, "accuracy", value, True, 20, {"role": role, "alpha": 0.3})
        for name, (typed, spoken, role) in scores.items()
        for bench, value in (("toolcall_typed", typed), ("toolcall_spoken", spoken))
    ]
    assert "Tool call" not in table1_merge_grid(group_checkpoints(plain)).markdown()
    ckpts = group_checkpoints(scored)
    table = table1_merge_grid(ckpts)
    assert table.csv_header[-2:] == ["toolcall_typed", "toolcall_spoken"]
    assert table.rows[0][-2:] == ["0.950", "0.100"]  # devstral, the first parent
    assert "Tool call typed (%)" in table4_final_vs_parents(ckpts).markdown()
    assert pareto_checkpoints(ckpts, tmp_path / "p.png") == tmp_path / "p.png"
    assert pareto_checkpoints(group_checkpoints(plain), tmp_path / "q.png") is None


def test_final_model_by_tool_calls_when_there_is_no_mmlu_audio():
    """The miniature's Table 4: the SFT step with the best typed + spoken tool-call accuracy, and its base."""
    labels = {"role": "sft", "base": "linear-0.50"}
    records = [Record("linear-0.50", "toolcall_spoken", "accuracy", 0.1, True, 20, {"role": "merge"})]
    for name, typed, spoken in (("sft@30", 0.9, 0.5), ("sft@60", 0.85, 0.7), ("sft@90", 0.2, 0.75)):
        records += [
            Record(name, "toolcall_typed", "accuracy", typed, True, 20, labels),
            Record(name, "toolcall_spoken", "accuracy", spoken, True, 20, labels),
        ]
    rows = [title for title, _ in final_comparison(group_checkpoints(records))]
    assert rows == ["Merged: linear-0.50", "+ SFT: sft@60"]


def test_merge_tradeoff_figure_needs_typed_tool_calls_and_wer(tmp_path):
    """The miniature's merge-grid figure: typed tool calls vs transcription, drawn only when both are scored."""
    merges = {"linear-0.1": (1.0, 1.2), "linear-0.5": (0.1, 0.7), "linear-0.9": (0.0, 0.1)}
    typed = [
        Record(name, "toolcall_typed", "accuracy", value, True, 20, {"role": "merge", "alpha": float(name[-3:])})
        for name, (value, _) in merges.items()
    ]
    assert merge_tradeoff(group_checkpoints(typed), tmp_path / "p.png") is None
    heard = typed + [
        Record(name, "librispeech", "wer", wer, False, 20, {"role": "merge"}) for name, (_, wer) in merges.items()
    ]
    assert merge_tradeoff(group_checkpoints(heard), tmp_path / "q.png") == tmp_path / "q.png"
