"""The miniature recipe's plumbing (fast): recipe validation, stage caching, and the held-out benchmark files
built from the task generators (valid benchmark files, nothing from the training split)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from megatron_ext.eval.benchmarks import get_benchmark, load_samples
from megatron_ext.miniature import tasks
from megatron_ext.miniature.data import DEFAULT_VOICES
from megatron_ext.miniature.pipeline import RecipeError, build_eval_data, load_recipe, run_recipe, stage

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "miniature" / "recipe.yaml"


def test_the_shipped_recipe_loads():
    recipe = load_recipe(RECIPE)
    assert recipe.mixtures == ("50:50", "30:70") and recipe.grid.is_file() and recipe.sft_config.is_file()
    assert recipe.eval_voice not in DEFAULT_VOICES  # spoken evaluation in a voice no training data uses


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sft_bsae: linear-0.10\n", "unknown key 'sft_bsae'"),
        ("mixtures: ['80-20']\n", "mixtures: '80-20' is not TEXT:AUDIO"),
        ("mixtures: ['100:0']\n", "mixtures: '100:0' is not TEXT:AUDIO"),
        ("[1, 2]\n", "expected a mapping"),
        ("eval_voice: espeak:en-us\n", "eval_voice 'espeak:en-us' is a training voice"),
        ("lora_mixtures: ['50']\n", "mixtures: '50' is not TEXT:AUDIO"),
    ],
)
def test_bad_recipe_names_file_and_key(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.read_text() + text if not text.startswith("[") else text)
    with pytest.raises(RecipeError, match=f"{path}: {message}"):
        load_recipe(path)


def test_stage_reuses_same_key_and_rebuilds_other_or_unfinished(tmp_path):
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "result.txt").write_text(str(len(calls)))

    directory = tmp_path / "stage-a"
    stage(directory, {"n": 1}, build)
    stage(directory, {"n": 1}, build)
    assert len(calls) == 1 and (directory / "result.txt").read_text() == "1"
    stage(directory, {"n": 2}, build)  # other settings: rebuilt from scratch
    assert len(calls) == 2 and (directory / "result.txt").read_text() == "2"

    def crash(out: Path) -> None:
        (out / "partial.txt").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        stage(directory, {"n": 3}, crash)
    assert not (directory / "stage.json").exists()  # an unfinished stage is never taken as done
    stage(directory, {"n": 3}, build)
    assert not (directory / "partial.txt").exists() and len(calls) == 3


def test_eval_data_is_held_out_and_valid(tmp_path):
    recipe = dataclasses.replace(load_recipe(RECIPE, output=tmp_path), eval_toolcall=6, eval_asr=3, eval_qa=3)
    data = build_eval_data(recipe)
    typed = load_samples(get_benchmark("toolcall_typed"), data / "toolcall_typed.jsonl")
    spoken = load_samples(get_benchmark("toolcall_spoken"), data / "toolcall_spoken.jsonl")
    assert [s.id for s in typed] == [s.id for s in spoken] and len(typed) == 6
    train = tasks.tool_call_tasks(recipe.seed).train
    assert not {s.fields["instruction"] for s in typed} & {r["instruction"] for r in train}
    asr = load_samples(get_benchmark("librispeech"), data / "librispeech.jsonl")
    train_sentences = {r["text"] for r in tasks.transcription_tasks(recipe.seed).train}
    assert len(asr) == 3 and not {s.fields["text"] for s in asr} & train_sentences
    qa = load_samples(get_benchmark("llama_questions"), data / "llama_questions.jsonl")
    assert len(qa) == 3 and all(not s.fields["answers"][0].endswith(".") for s in qa)
    assert json.loads((data / "stage.json").read_text())["eval_toolcall"] == 6


def test_missing_parents_stop_before_any_stage(tmp_path):
    recipe = load_recipe(RECIPE, devstral=tmp_path / "absent", output=tmp_path / "out")
    with pytest.raises(RecipeError, match="absent: not a parent checkpoint .*make miniature"):
        run_recipe(recipe)
    assert not (tmp_path / "out").exists()
