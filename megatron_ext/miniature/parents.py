"""The miniature's trained parents: a common base decoder, then Devstral-mini and Voxtral-mini from it.

`build_parents(out, cfg)`, everything with the project's own code, deterministic per seed:
  1. tokenizers (tokenizer.py) and data (data.py, speech from the project's TTS);
  2. base: a fresh decoder (HF Mistral layout -> torch_dist by convert) trained by the SFT loop on plain
     documents, loss on every token;
  3. Devstral-mini: the base fine-tuned on tool-call chats (Devstral's tokenizer, v11 tool calls);
  4. Voxtral-mini: the base decoder + a fresh Whisper-style encoder (short chunks, `chunk_frames`) and
     projector, all trained on transcription and spoken questions (Voxtral's tokenizer); 3 and 4 run side by
     side, one process each;
  5. both exported to HF (`voxtral-mini-hf`, `devstral-mini-hf`: the tiny stand-ins' layouts), scored on the
     held-out splits (scoring.py), and published atomically with MANIFEST.json.
The output is cached: MANIFEST.json records a key hashing the generating code, the config and the TTS
engines' versions; `build_parents` returns an existing output with the same key without training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from megatron_ext.audio.features import HOP
from megatron_ext.audio.positions import sinusoids
from megatron_ext.audio.waveform import SAMPLE_RATE
from megatron_ext.checkpoint.atomic import atomic_dir, write_atomic
from megatron_ext.checkpoint.convert import convert
from megatron_ext.checkpoint.shapes import decoder_shapes, encoder_shapes, to_hf_names
from megatron_ext.config import DecoderConfig, EncoderConfig, ModelConfig, RopeConfig
from megatron_ext.errors import ProjectError
from megatron_ext.miniature.data import DEFAULT_VOICES, write_data
from megatron_ext.miniature.scoring import speech_scores, tool_call_exact_match
from megatron_ext.miniature.tokenizer import miniature_tekkens
from megatron_ext.testing.tiny_models import write_hf
from megatron_ext.training.checkpointing import latest_checkpoint
from megatron_ext.training.config import (
    CheckpointSection,
    DataSection,
    LoggingSection,
    ModelSection,
    OptimizerSection,
    ParallelSection,
    SourceSection,
    TrainConfig,
    TrainingSection,
    validate,
)

MANIFEST = "MANIFEST.json"
PARENTS = ("voxtral-mini-hf", "devstral-mini-hf")
# The library code a parent depends on: a change to any of it invalidates the cache.
KEYED_CODE = (
    *(f"miniature/{m}.py" for m in ("parents", "tasks", "data", "tokenizer", "scoring")),  # not the recipe
    *("training", "data", "models", "audio", "tokenizer", "checkpoint", "config.py"),
)
AUDIO_TOKEN_ID = 24  # [AUDIO] in Voxtral's tokenizer (tekken_builder.VOXTRAL_SPECIALS)


class MiniatureError(ProjectError, RuntimeError):
    """A miniature stage failed (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One SFT run: steps, peak learning rate, sequence length and sequences per step."""

    steps: int
    lr: float
    seq_length: int
    batch: int
    warmup: int = 10


@dataclasses.dataclass(frozen=True)
class MiniatureConfig:
    """Everything the parents depend on besides the code (hashed into the cache key)."""

    seed: int = 0
    vocab_size: int = 1920
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    num_query_groups: int = 2
    encoder_layers: int = 2
    encoder_hidden: int = 128
    encoder_heads: int = 4
    chunk_frames: int = 400  # 4 s audio chunks (Whisper: 3000 = 30 s)
    voices: tuple[str, ...] = DEFAULT_VOICES
    clips_per_sentence: int = 1
    init_std: float = 0.05  # fresh matrices; GPT's 0.02 left the 128-wide model ignoring its context for longer
    instruction_clips: int = 400  # spoken coding instructions Voxtral-mini transcribes (tool-call train split)
    base: Stage = Stage(steps=40, lr=3e-3, seq_length=512, batch=8)
    # Small batches, many steps: per update the tiny models learn far more than per token. Devstral-mini's
    # held-out exact match: 120 steps x 8 sequences 0%, 360 x 8 11%, 720 x 4 48% (five-tool prompts, compound
    # identifiers); with these prompts 800 x 4 gave 93%, 57% and 43% in three runs (a path's directory or its
    # module copied, not yet both), hence 1200. Voxtral-mini's transcription loss drops sharply after ~250 steps.
    devstral: Stage = Stage(steps=1200, lr=2e-3, seq_length=256, batch=4)
    voxtral: Stage = Stage(steps=400, lr=2e-3, seq_length=256, batch=8)

    @property
    def chunk_seconds(self) -> float:
        return self.chunk_frames * HOP / SAMPLE_RATE

    def decoder(self) -> DecoderConfig:
        return DecoderConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.hidden_size // self.num_attention_heads,
            vocab_size=self.vocab_size,
            norm_eps=1e-5,
            max_position_embeddings=4096,
            rope=RopeConfig(theta=1e6),
        )

    def models(self) -> dict[str, ModelConfig]:
        """The parents' architectures: Devstral-mini (HF Mistral) and Voxtral-mini (HF Voxtral)."""
        encoder = EncoderConfig(
            num_layers=self.encoder_layers,
            hidden_size=self.encoder_hidden,
            ffn_hidden_size=4 * self.encoder_hidden,  # = the projector's 4-frame stacking width, as in Voxtral
            num_attention_heads=self.encoder_heads,
            max_source_positions=self.chunk_frames // 2,
        )
        return {
            "devstral": ModelConfig(self.decoder(), hf_architecture="mistral"),
            "voxtral": ModelConfig(self.decoder(), encoder, AUDIO_TOKEN_ID, 4, "voxtral"),
        }

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cache_key(cfg: MiniatureConfig) -> str:
    """sha256 over the keyed library code, the config and the TTS engines' versions."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(json.dumps(cfg.as_dict(), sort_keys=True).encode())
    for entry in KEYED_CODE:
        paths = [root / entry] if entry.endswith(".py") else sorted((root / entry).rglob("*.py"))
        for path in paths:
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    h.update(_tts_versions().encode())
    return h.hexdigest()


def _tts_versions() -> str:
    try:
        espeak = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        espeak = "missing"
    return f"piper-tts {metadata.version('piper-tts')}; {espeak}"


def cached(out: Path, key: str) -> dict[str, Any] | None:
    """The manifest of a complete output built with `key`, else None."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    complete = all((out / name / "config.json").is_file() for name in PARENTS)
    return manifest if manifest.get("key") == key and complete else None


# ---- fresh weights ---------------------------------------------------------------------------------------
def _init(name: str, shape: tuple[int, ...], gen: torch.Generator, std: float, out_scale: float) -> torch.Tensor:
    """GPT-style init for training from scratch: matrices N(0, std) (output projections / out_scale), norms 1,
    biases 0; conv kernels N(0, 1/fan_in)."""
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    if len(shape) == 3:
        return torch.randn(shape, generator=gen) / (shape[1] * shape[2]) ** 0.5
    if any(k in name for k in ("o_proj", "down_proj", "out_proj", "fc2")):
        std /= out_scale
    return torch.randn(shape, generator=gen) * std


def fresh_state(shapes: dict[str, tuple[int, ...]], seed: int, layers: int, std: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: _init(n, s, gen, std, (2 * layers) ** 0.5) for n, s in sorted(shapes.items())}


# ---- SFT runs, each in its own process ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SFTJob:
    """Train `checkpoint` on `data` (one JSONL source) for `stage`, saving under `save_dir`."""

    stage: Stage
    checkpoint: Path
    data: Path
    save_dir: Path
    seed: int
    freeze_encoder: bool = True

    def config(self) -> TrainConfig:
        stage = self.stage
        cfg = TrainConfig(
            model=ModelSection(
                checkpoint=str(self.checkpoint),
                freeze_encoder=self.freeze_encoder,
                transformer_impl="local",
                verify=False,
            ),
            parallel=ParallelSection(use_distributed_optimizer=False),
            optimizer=OptimizerSection(
                lr=stage.lr, min_lr_ratio=0.1, weight_decay=0.01, warmup_steps=stage.warmup, clip_grad=1.0
            ),
            data=DataSection(sources=[SourceSection(name=self.data.stem, path=str(self.data))], shuffle_buffer=64),
            training=TrainingSection(
                seq_length=stage.seq_length,
                micro_batch_size=stage.batch,
                global_batch_size=stage.batch,
                train_iters=stage.steps,
                seed=self.seed,
                bf16=False,
                loss_chunk_tokens=4096,
            ),
            checkpoint=CheckpointSection(
                save_dir=str(self.save_dir), save_interval=stage.steps, keep_last=1, resume=False
            ),
            logging=LoggingSection(tensorboard_dir=str(self.save_dir / "tensorboard"), log_interval=50),
        )
        validate(cfg)
        return cfg


def _train_entry(train_cfg: TrainConfig, threads: int) -> None:
    import logging

    from megatron_ext.training.sft import train

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(train_cfg)


def run_sft(*jobs: SFTJob) -> list[Path]:
    """Run the jobs at once with the project's SFT loop (gloo, one rank each), the host's cores split between
    them (tiny models use one thread better than two); returns each job's final iter_* directory."""
    threads = max(1, (os.cpu_count() or 1) // len(jobs))
    spawn = multiprocessing.get_context("spawn")
    processes = [spawn.Process(target=_train_entry, args=(job.config(), threads)) for job in jobs]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    finals = []
    for job, process in zip(jobs, processes, strict=True):
        final = latest_checkpoint(job.save_dir)
        if process.exitcode != 0 or final is None:
            raise MiniatureError(
                f"SFT of {job.checkpoint} on {job.data} failed (exit code {process.exitcode}); see above"
            )
        finals.append(final)
    return finals


# ---- the build -------------------------------------------------------------------------------------------
def _to_hf(checkpoint: Path, out: Path) -> Path:
    convert(checkpoint, out, "hf", progress=False)
    return out


def _to_torch_dist(hf: Path, out: Path) -> Path:
    convert(hf, out, "megatron", progress=False)
    return out


def _cpu_s() -> float:
    """CPU seconds used so far by this process and its waited-for children (the SFT stage processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def build_parents(
    out: Path, cfg: MiniatureConfig = MiniatureConfig(), work: Path | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Build (or reuse, see the module docstring) the two parents under `out`; returns the manifest. Intermediate
    files (data, init and stage checkpoints, TensorBoard logs) stay in `work` (default: `OUT.work`)."""
    out = Path(out)
    key = cache_key(cfg)
    manifest = cached(out, key)
    if manifest is not None:
        log(f"miniature: reusing {out} (key {key[:12]})")
        return manifest
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    models, timings, started, cpu = cfg.models(), {}, time.perf_counter(), [_cpu_s()]

    def lap(name: str, t0: float) -> None:
        """Wall and CPU seconds of a step (CPU: this process and its stage processes; steadier on a busy host)."""
        timings[name] = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(_cpu_s() - cpu[-1], 1)}
        cpu.append(_cpu_s())
        log(f"miniature: {name} done in {timings[name]['wall_s']} s ({timings[name]['cpu_s']} CPU s)")

    t0 = time.perf_counter()
    tekkens = miniature_tekkens(cfg.seed, cfg.vocab_size, cfg.chunk_seconds)
    files = write_data(work / "data", cfg.seed, cfg.voices, cfg.clips_per_sentence, cfg.instruction_clips)
    lap("tokenizers+data", t0)

    t0 = time.perf_counter()
    dec = models["devstral"].decoder
    write_hf(
        work / "base-init-hf",
        models["devstral"],
        fresh_state(decoder_shapes(dec), cfg.seed, dec.num_layers, cfg.init_std),
        tekkens["devstral"],
    )
    base_init = _to_torch_dist(work / "base-init-hf", work / "base-init")
    (base,) = run_sft(SFTJob(cfg.base, base_init, files["base"], work / "base", cfg.seed))
    lap("base", t0)

    t0 = time.perf_counter()
    base_hf = load_file(str(_to_hf(base, work / "base-hf") / "model.safetensors"))
    vox_cfg = models["voxtral"]
    audio = fresh_state(encoder_shapes(vox_cfg), cfg.seed + 100, cfg.encoder_layers, cfg.init_std)
    audio["audio_tower.embed_positions.weight"] = sinusoids(vox_cfg.encoder.max_source_positions, cfg.encoder_hidden)
    write_hf(work / "voxtral-init-hf", vox_cfg, to_hf_names(base_hf, "voxtral") | audio, tekkens["voxtral"])
    vox_init = _to_torch_dist(work / "voxtral-init-hf", work / "voxtral-init")
    dev, vox = run_sft(  # the siblings train side by side, like Devstral and Voxtral from Mistral Small
        SFTJob(cfg.devstral, base, files["devstral"], work / "devstral", cfg.seed),
        SFTJob(cfg.voxtral, vox_init, files["voxtral"], work / "voxtral", cfg.seed, freeze_encoder=False),
    )
    lap("devstral-mini+voxtral-mini", t0)

    t0 = time.perf_counter()
    export = work / "export"
    _to_hf(vox, export / "voxtral-mini-hf")
    _to_hf(dev, export / "devstral-mini-hf")
    shutil.copytree(work / "data" / "heldout", export / "heldout")
    lap("export", t0)
    t0 = time.perf_counter()
    scores = score_parents(export, work / "eval")
    lap("scoring", t0)
    timings["total"] = {"wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(_cpu_s() - cpu[0], 1)}
    manifest = {
        "key": key,
        "config": cfg.as_dict(),
        "parents": {"voxtral": "voxtral-mini-hf", "devstral": "devstral-mini-hf"},
        "heldout": {
            "asr": "heldout/asr.jsonl",
            "spoken_qa": "heldout/qa.jsonl",
            "tool_calls": "heldout/tool_calls.jsonl",
        },
        "scores": scores,
        "timings_s": timings,
        "files": _digests(export),
    }
    with atomic_dir(out, overwrite=True) as tmp:
        shutil.copytree(export, tmp, dirs_exist_ok=True)
        write_atomic(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def score_parents(root: Path, results: Path) -> dict[str, dict[str, float]]:
    """Each parent on the held-out splits: typed tool calls for both, speech for the one that hears."""
    records = [json.loads(line) for line in (root / "heldout" / "tool_calls.jsonl").read_text().splitlines()]
    scores = {}
    for tag in ("voxtral", "devstral"):
        accuracy, _ = tool_call_exact_match(root / f"{tag}-mini-hf", records)
        scores[tag] = {"tool_call_exact_match": accuracy}
    scores["voxtral"] |= speech_scores(
        root / "voxtral-mini-hf",
        root / "heldout" / "asr.jsonl",
        root / "heldout" / "qa.jsonl",
        results / "records.jsonl",
    )
    return scores
