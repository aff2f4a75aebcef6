"""Issue 20's acceptance on the trained miniature (slow): the recipe run end to end on Devstral-mini and
Voxtral-mini must show the paper's orderings, and a deliberately broken variant (the tokenizer map's
Voxtral rows shuffled) must measurably break the audio scores, proving the metrics can fail.

The parents come from `make miniature` (cached under build/miniature by code and data hashes); the recipe
stages run into a temporary directory. Targets the issue names but does not require are printed, not asserted.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.eval.store import load_results
from megatron_ext.miniature.pipeline import (
    build_merges,
    evaluate_checkpoint,
    grid_runs,
    load_recipe,
    run_recipe,
    sft_name,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "miniature" / "recipe.yaml"
# Tolerances, in accuracy / WER points (held-out sets of 15-60 samples: one sample is 1.7-7 points).
NOISE = 0.10  # a linear alpha step may go the "wrong" way by this much
FAR = 0.40  # "clearly better": the gap between parents on their own tasks
# "well above": spoken tool-call accuracy, SFT over its base merge (9 of 60 held-out calls from a merge that gets
# none; the 60% is printed: Voxtral-mini itself hears too few argument words, README "The miniature")
SFT_GAIN = 0.15
TYPED_KEPT = 0.10  # SFT keeps typed accuracy within 10 points of Devstral-mini's
BROKEN = 0.20  # the broken variant's loss on the score it breaks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The recipe on the trained parents; returns (recipe, {checkpoint: {benchmark: value}}, labels)."""
    venv = Path(sys.executable).parents[1]  # the environment running the tests
    subprocess.run(["make", "-s", "miniature", f"VENV={venv}"], cwd=ROOT, check=True)
    recipe = load_recipe(RECIPE, output=tmp_path_factory.mktemp("miniature") / "recipe")
    recipe = dataclasses.replace(recipe, devstral=ROOT / recipe.devstral, voxtral=ROOT / recipe.voxtral)
    run_recipe(recipe)
    scores, labels = {}, {}
    for r in load_results(recipe.output / "eval" / "results"):
        scores.setdefault(r.checkpoint, {})[r.benchmark] = r.value
        labels.setdefault(r.checkpoint, {}).update(r.labels)
    for name in sorted(scores):
        print(name, json.dumps(scores[name]))
    return recipe, scores, labels


def test_each_parent_is_better_on_its_own_task(run):
    _, scores, _ = run
    dev, vox = scores["devstral-mini"], scores["voxtral-mini"]
    assert dev["toolcall_typed"] >= vox["toolcall_typed"] + FAR
    # Devstral-mini has no audio encoder: its WER is 1.0 (no transcript at all); the nearest it can be heard
    # is the merge closest to it, which Voxtral-mini must beat by far as well.
    assert vox["librispeech"] <= 1.0 - FAR
    assert vox["librispeech"] <= scores["linear-0.10"]["librispeech"] - FAR
    print(f"targets: Voxtral-mini WER {vox['librispeech']:.3f} (<= 0.25)", end="; ")
    print(f"Devstral-mini typed tool-call accuracy {dev['toolcall_typed']:.3f} (>= 0.90)")


def test_linear_alphas_trace_the_trade_off(run):
    _, scores, labels = run
    linear = sorted(
        (
            (labels[n]["alpha"], s)
            for n, s in scores.items()
            if labels[n].get("role") == "merge" and labels[n].get("method") == "linear"
        ),
        key=lambda pair: pair[0],
    )
    assert len(linear) >= 3
    for (a0, s0), (a1, s1) in zip(linear, linear[1:], strict=False):
        assert s1["toolcall_typed"] <= s0["toolcall_typed"] + NOISE, (a0, a1)  # toward Voxtral: less coding
        assert s1["librispeech"] <= s0["librispeech"] + NOISE, (a0, a1)  # and better hearing
        assert s1["llama_questions"] >= s0["llama_questions"] - NOISE, (a0, a1)
    (_, first), (_, last) = linear[0], linear[-1]
    assert first["toolcall_typed"] >= last["toolcall_typed"] + FAR
    assert last["librispeech"] <= first["librispeech"] - FAR


def test_sft_recovers_spoken_instructions_and_keeps_typed(run):
    recipe, scores, labels = run
    base = scores[recipe.sft_base]
    dev_typed = scores["devstral-mini"]["toolcall_typed"]
    best = max((s for n, s in scores.items() if labels[n].get("role") == "sft"), key=lambda s: s["toolcall_spoken"])
    assert best["toolcall_spoken"] >= base["toolcall_spoken"] + SFT_GAIN
    assert best["toolcall_typed"] >= dev_typed - TYPED_KEPT
    for mixture in recipe.mixtures:  # every mixture ran and was scored
        assert any(n.startswith(sft_name(mixture) + "@") for n in scores), mixture
    print(f"target: spoken tool-call accuracy after SFT {best['toolcall_spoken']:.3f} (>= 0.60)")


def test_shuffled_tokenizer_map_breaks_the_audio_scores(run, tmp_path):
    """The same Voxtral-heavy merge with the tokenizer map's Voxtral rows permuted (each special row copied
    or averaged into another token's slot): transcription and spoken tool calls fall apart."""
    recipe, scores, _ = run
    correct_map = json.loads((recipe.output / "merge-grid" / "tokenizer" / "tokenizer_map.json").read_text())
    ranks = list(correct_map["voxtral_to_merged"])
    targets = [correct_map["voxtral_to_merged"][r] for r in ranks]
    shuffled = dict(zip(ranks, targets[1:] + targets[:1], strict=True))  # every row one slot along
    broken_map = tmp_path / "tokenizer_map.json"
    broken_map.write_text(json.dumps(correct_map | {"voxtral_to_merged": shuffled}))
    grid = tmp_path / "grid.yaml"
    grid.write_text("runs:\n  - {name: linear-0.90-shuffled-map, method: linear, alpha: 0.90}\n")
    broken = build_merges(dataclasses.replace(recipe, grid=grid), tokenizer_map=broken_map, name="merge-broken-map")
    results = tmp_path / "results"
    evaluate_checkpoint(
        recipe,
        grid_runs(broken)[0],
        recipe.output / "eval-data",
        results,
        audio=True,
        labels={"role": "broken"},
    )
    bad = {r.benchmark: r.value for r in load_results(results)}
    ok = scores["linear-0.90"]
    print(f"linear-0.90 correct map {ok} vs shuffled map {bad}")
    assert bad["librispeech"] >= ok["librispeech"] + BROKEN
    assert bad["toolcall_spoken"] <= ok["toolcall_spoken"] or ok["toolcall_spoken"] == 0.0
