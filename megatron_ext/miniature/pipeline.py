"""The Devstral Audio recipe on the miniature parents (issue 20), stage by stage with the project's own tools:
held-out benchmark files (typed and spoken tool calls, transcription WER, spoken QA), tokenizer alignment,
the merge grid, spoken versions of Devstral-mini's training instructions (synth pipeline), SFT of the chosen
merge on text:audio mixtures (Megatron-Core, torchrun), evaluation of every checkpoint, and the report.

Each stage writes one directory under `Recipe.output` and a `stage.json` holding its key (its settings, the
digests of its inputs and of the library code) last; a rerun with the same key skips the stage, so trained
artifacts are reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_ext.checkpoint.atomic import write_atomic
from megatron_ext.checkpoint.convert import convert
from megatron_ext.data.synth.config import SynthConfig
from megatron_ext.data.synth.pipeline import run as run_synth
from megatron_ext.errors import ProjectError
from megatron_ext.eval.generation import load_generator
from megatron_ext.eval.report import build_report
from megatron_ext.eval.runner import evaluate
from megatron_ext.eval.store import checkpoint_identity, read_records, write_jsonl
from megatron_ext.eval.voice import voice_benchmark
from megatron_ext.merge.grid import run_grid
from megatron_ext.merge.methods import MergeParams
from megatron_ext.merge.run import MergeJob
from megatron_ext.miniature import tasks
from megatron_ext.miniature.data import DEFAULT_VOICES, make_engine
from megatron_ext.tokenizer.align import write_alignment

ROOT = Path(__file__).resolve().parents[2]
STAGE_FILE = "stage.json"
PARENTS = {"devstral": "Devstral-mini", "voxtral": "Voxtral-mini"}
AUDIO_BENCHMARKS = ("toolcall_spoken", "librispeech", "llama_questions")


class RecipeError(ProjectError, ValueError):
    """The miniature recipe cannot run as configured (the message names the file or field)."""


@dataclass(frozen=True)
class Recipe:
    """Settings of one miniature run (examples/miniature/recipe.yaml); paths relative to the repository."""

    devstral: Path
    voxtral: Path
    output: Path
    grid: Path
    sft_config: Path
    sft_base: str  # the grid run SFT starts from
    mixtures: tuple[str, ...]  # text:audio ratios, e.g. "80:20"
    seed: int = 0
    eval_toolcall: int = 40  # held-out samples per benchmark
    eval_asr: int = 20
    eval_qa: int = 20
    text_samples: int = 2000  # typed tool-call chats in the SFT text source
    synth_samples: int = 200  # training instructions voiced for the SFT audio source
    synth_engine: str = "piper"
    eval_voice: str = "espeak:en-us+m3"  # spoken benchmarks in a voice no parent or SFT data was trained on
    nproc: int = 2
    max_new_tokens: int = 64
    sft_overrides: tuple[str, ...] = field(default_factory=tuple)
    lora_mixtures: tuple[str, ...] = ()  # mixtures also fine-tuned with LoRA adapters instead of full SFT
    lora_rank: int = 8
    lora_alpha: float = 16.0


def load_recipe(path: Path, **overrides: Any) -> Recipe:
    """A Recipe from YAML plus keyword overrides (None values ignored); RecipeError names the bad key."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: cannot read recipe: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of recipe settings")
    data |= {k: v for k, v in overrides.items() if v is not None}
    known = {f.name: f for f in dataclasses.fields(Recipe)}
    for key in data:
        if key not in known:
            raise RecipeError(f"{path}: unknown key {key!r}; known: {', '.join(known)}")
    try:
        recipe = Recipe(**data)
    except TypeError as e:
        raise RecipeError(f"{path}: {e}") from None
    recipe = dataclasses.replace(
        recipe,
        **{k: Path(getattr(recipe, k)) for k in ("devstral", "voxtral", "output", "grid", "sft_config")},
        mixtures=tuple(str(m) for m in recipe.mixtures),
        sft_overrides=tuple(recipe.sft_overrides),
        lora_mixtures=tuple(str(m) for m in recipe.lora_mixtures),
    )
    if recipe.eval_voice in DEFAULT_VOICES or recipe.eval_voice == recipe.synth_engine:
        raise RecipeError(f"{path}: eval_voice {recipe.eval_voice!r} is a training voice; pick an unseen one")
    for mixture in recipe.mixtures + recipe.lora_mixtures:
        parts = mixture.split(":")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise RecipeError(f"{path}: mixtures: {mixture!r} is not TEXT:AUDIO with two positive integers")
    return recipe


def dir_digest(path: Path) -> str:
    """What a directory's content is taken to be: relative names, sizes and mtimes of its files."""
    files = sorted(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(path).rglob("*") if p.is_file()
    )
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def code_digest() -> str:
    """The library's code (every megatron_ext source file): part of every stage key, so changed code reruns."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "megatron_ext").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def stage(directory: Path, key: dict, build: Callable[[Path], None]) -> Path:
    """Run `build(directory)` unless `directory/stage.json` already holds `key` (plus the code digest); a stale
    or partial directory is removed first, and stage.json is written last, so an interrupted stage reruns."""
    key = {**key, "code": code_digest()}
    marker = directory / STAGE_FILE
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == key:
        print(f"[miniature] {directory.name}: reused (same settings and inputs)", flush=True)
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    t0 = time.time()
    build(directory)
    write_atomic(marker, (json.dumps(key, indent=1) + "\n").encode())
    print(f"[miniature] {directory.name}: done in {time.time() - t0:.1f} s", flush=True)
    return directory


# ---- benchmark files from the task generators' held-out splits --------------------------------------------------
def build_eval_data(recipe: Recipe) -> Path:
    """Held-out benchmark files: typed and spoken tool calls, transcription (WER) and spoken QA."""
    key = {"stage": "eval-data", **_fields(recipe, "seed", "eval_toolcall", "eval_asr", "eval_qa", "eval_voice")}

    def build(out: Path) -> None:
        tts = make_engine(recipe.eval_voice)
        typed = tasks.tool_call_tasks(recipe.seed).heldout[: recipe.eval_toolcall]
        write_jsonl(out / "toolcall_typed.jsonl", typed)
        voice_benchmark("toolcall_spoken", out / "toolcall_typed.jsonl", out / "toolcall_spoken.jsonl", tts)
        sentences = tasks.transcription_tasks(recipe.seed).heldout[: recipe.eval_asr]
        write_jsonl(out / "asr_text.jsonl", sentences)
        voice_benchmark("librispeech", out / "asr_text.jsonl", out / "librispeech.jsonl", tts)
        questions = tasks.spoken_qa_tasks(recipe.seed).heldout[: recipe.eval_qa]
        rows = [{"id": q["id"], "question": q["question"], "answers": [q["answer"].rstrip(".")]} for q in questions]
        write_jsonl(out / "qa_text.jsonl", rows)
        voice_benchmark("llama_questions", out / "qa_text.jsonl", out / "llama_questions.jsonl", tts)

    return stage(recipe.output / "eval-data", key, build)


# ---- SFT data: typed chats and their spoken versions ------------------------------------------------------------
def build_sft_data(recipe: Recipe) -> Path:
    """Devstral-mini's training instructions as chats (the SFT text source) and, voiced by the synth pipeline
    (offline judge, `synth_engine`), as spoken-instruction chats in Energon shards (the audio source)."""
    key = {"stage": "sft-data", **_fields(recipe, "seed", "text_samples", "synth_samples", "synth_engine")}

    def build(out: Path) -> None:
        train = tasks.tool_call_tasks(recipe.seed).train
        # one call id, as in Devstral-mini's training: a fresh id per chat would be 9 unpredictable tokens per
        # answer (~1.6 nats per supervised token of pure noise in the SFT loss)
        chats = [tasks.tool_call_chat(r) for r in train]
        write_jsonl(out / "text.jsonl", chats[: recipe.text_samples])
        write_jsonl(out / "trajectories.jsonl", chats[: recipe.synth_samples])
        run_synth(
            SynthConfig(
                input=out / "trajectories.jsonl",
                output=out / "synth",
                workers=recipe.nproc,
                num_shards=recipe.nproc,
                tts_engine=recipe.synth_engine,
                seed=recipe.seed,
            )
        )

    return stage(recipe.output / "sft-data", key, build)


# ---- tokenizer alignment and the merge grid ---------------------------------------------------------------------
def build_merges(recipe: Recipe, tokenizer_map: Path | None = None, name: str = "merge-grid") -> Path:
    """The tokenizer alignment of the two parents, then every grid configuration merged with it (HF layout).
    `tokenizer_map` replaces the computed alignment (the acceptance test's broken variant)."""
    key = {
        "stage": name,
        "grid": recipe.grid.read_text(encoding="utf-8"),
        "parents": [dir_digest(recipe.devstral), dir_digest(recipe.voxtral)],
        "tokenizer_map": tokenizer_map.read_text(encoding="utf-8") if tokenizer_map else None,
    }

    def build(out: Path) -> None:
        alignment = out / "tokenizer"
        write_alignment(recipe.devstral / "tekken.json", recipe.voxtral / "tekken.json", alignment)
        job = MergeJob(
            devstral=recipe.devstral,
            voxtral=recipe.voxtral,
            output=out / "runs",
            params=MergeParams(method="linear", alpha=0.0),
            tokenizer_map=tokenizer_map or alignment / "tokenizer_map.json",
            rope_from="devstral",
            progress=False,
        )
        run_grid(recipe.grid, job)

    return stage(recipe.output / name, key, build)


def grid_runs(merges: Path) -> list[Path]:
    """The merged checkpoints of a merge stage, in grid order."""
    manifest = json.loads((merges / "runs" / "manifest.json").read_text(encoding="utf-8"))
    return [Path(r["output"]) for r in manifest["runs"]]


# ---- SFT ---------------------------------------------------------------------------------------------------------
def sft_name(mixture: str, lora: bool = False) -> str:
    return ("sft-lora-" if lora else "sft-") + mixture.replace(":", "-")


def build_sft(recipe: Recipe, merges: Path, data: Path, mixture: str, lora: bool = False) -> Path:
    """SFT of the chosen merge on one text:audio mixture: the merge converted to torch_dist (named like the
    grid run, so reports find the SFT's base), then tools/train.py under torchrun with the recipe's config;
    `lora`: LoRA adapters (recipe.lora_rank / lora_alpha, the default targets) instead of every weight."""
    base = merges / "runs" / recipe.sft_base
    if not (base / "config.json").is_file():
        raise RecipeError(f"sft_base {recipe.sft_base!r}: no such run in {recipe.grid}")
    name = sft_name(mixture, lora)
    lora_overrides = [f"model.lora={{rank: {recipe.lora_rank}, alpha: {recipe.lora_alpha}}}"] if lora else []
    key = {
        "stage": name,
        "base": dir_digest(base),
        "data": dir_digest(data),
        "config": recipe.sft_config.read_text(encoding="utf-8"),
        "lora": lora_overrides,
        **_fields(recipe, "nproc", "sft_overrides"),
    }

    def build(out: Path) -> None:
        start = out / "base" / recipe.sft_base
        convert(base, start, to="megatron", tp=1, progress=False)
        text, audio = (int(x) for x in mixture.split(":"))
        overrides = [
            f"model.checkpoint={start}",
            f"data.sources.0.path={data / 'text.jsonl'}",
            f"data.sources.0.ratio={text}",
            f"data.sources.1.path={data / 'synth' / 'wds'}",
            f"data.sources.1.ratio={audio}",
            f"data.validation.0.path={data / 'text.jsonl'}",
            f"checkpoint.save_dir={out / name}",
            f"logging.tensorboard_dir={out / name / 'tensorboard'}",
            *recipe.sft_overrides,
            *lora_overrides,
        ]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
        command += [f"--nproc-per-node={recipe.nproc}", str(ROOT / "tools" / "train.py"), "--config"]
        command += [str(recipe.sft_config), *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
            raise RecipeError(f"SFT {name} failed (command: {' '.join(command)})")

    return stage(recipe.output / name, key, build) / name


def sft_checkpoints(run: Path) -> list[Path]:
    """The saved steps of an SFT run, oldest first; a LoRA run's steps as HF exports with the adapters merged
    into their base (written once, next to the run)."""
    steps = sorted(run.glob("iter_*"))
    if not steps or not (steps[0] / "lora").is_dir():
        return steps
    (base,) = (run.parent / "base").iterdir()  # build_sft's torch_dist start, the adapters' base
    merged = []
    for step in steps:
        out = run.parent / "merged" / run.name / step.name
        if not (out / "config.json").is_file():
            convert(base, out, to="hf", lora=step / "lora", overwrite=True, progress=False)
        merged.append(out)
    return merged


# ---- evaluation and report ---------------------------------------------------------------------------------------
def evaluate_checkpoint(
    recipe: Recipe, checkpoint: Path, data: Path, results: Path, *, audio: bool, labels: dict, name: str | None = None
) -> None:
    """Score one checkpoint on the typed tool calls and, when it has an audio encoder, the spoken benchmarks;
    the model is loaded once, and finished predictions are reused (the runner resumes by checkpoint and data)."""
    generator = load_generator(checkpoint)
    for bench in ("toolcall_typed", *(AUDIO_BENCHMARKS if audio else ())):
        evaluate(
            bench,
            checkpoint,
            data / f"{bench}.jsonl",
            results / "records.jsonl",
            name=name,
            labels=labels,
            batch_size=16,
            max_new_tokens=recipe.max_new_tokens,
            generator=generator,
        )


def evaluate_all(recipe: Recipe, data: Path, merges: Path, sft_runs: list[Path]) -> Path:
    """Parents, every grid merge and every saved SFT step, into one results store; records of checkpoints that
    are gone (an SFT stage rebuilt with other steps) are dropped, so the report shows only this run's."""
    results = recipe.output / "eval" / "results"
    names = []
    for role, path in (("devstral", recipe.devstral), ("voxtral", recipe.voxtral)):
        labels = {"role": "parent", "display": PARENTS[role]}
        evaluate_checkpoint(recipe, path, data, results, audio=role == "voxtral", labels=labels, name=f"{role}-mini")
        names.append(f"{role}-mini")
    for run in grid_runs(merges):
        evaluate_checkpoint(recipe, run, data, results, audio=True, labels={"role": "merge"})
        names.append(checkpoint_identity(run)[0])
    for sft in sft_runs:
        for checkpoint in sft_checkpoints(sft):
            labels, name = {"role": "sft"}, None
            if checkpoint.parent.parent.name == "merged":  # a LoRA run's step, exported with its adapters merged
                step = int(checkpoint.name.removeprefix("iter_"))
                labels, name = {"role": "sft", "step": step, "lora_rank": recipe.lora_rank}, f"{sft.name}@{step}"
            evaluate_checkpoint(recipe, checkpoint, data, results, audio=True, labels=labels, name=name)
            names.append(name or checkpoint_identity(checkpoint)[0])
    records = results / "records.jsonl"
    stored = read_records(records)
    kept = [asdict(r) for r in stored if r.checkpoint in names]
    if len(kept) < len(stored):
        write_jsonl(records, kept)
    return results


def run_recipe(recipe: Recipe) -> Path:
    """Every stage in order; returns the report's REPORT.md."""
    for parent in (recipe.devstral, recipe.voxtral):
        if not (parent / "tekken.json").is_file():
            raise RecipeError(f"{parent}: not a parent checkpoint (no tekken.json); run `make miniature` first")
    data = build_eval_data(recipe)
    sft_data = build_sft_data(recipe)
    merges = build_merges(recipe)
    runs = [build_sft(recipe, merges, sft_data, m) for m in recipe.mixtures]
    runs += [build_sft(recipe, merges, sft_data, m, lora=True) for m in recipe.lora_mixtures]
    results = evaluate_all(recipe, data, merges, runs)
    report = recipe.output / "report"
    build_report(results, report, tensorboard=[r / "tensorboard" for r in runs], synth=sft_data / "synth")
    return report / "REPORT.md"


def _fields(recipe: Recipe, *names: str) -> dict:
    return {n: list(v) if isinstance(v := getattr(recipe, n), tuple) else v for n in names}
