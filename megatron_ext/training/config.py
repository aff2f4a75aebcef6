"""SFT run configuration: a typed omegaconf schema, YAML + dotted overrides, one-line errors.

`load_config(yaml, overrides)` merges the YAML and `key=value` overrides onto the schema; a key the
schema does not know, or a value of the wrong type, is refused with a message naming it. The paper's
recipe is `examples/configs/devstral_audio_sft.yaml`; `examples/configs/tiny_cpu.yaml` runs the same
code on the tiny models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_ext.checkpoint.lora_layout import DEFAULT_TARGETS, TARGETS
from megatron_ext.config import RopeConfig
from megatron_ext.errors import ProjectError


class TrainConfigError(ProjectError, ValueError):
    """The training configuration is invalid (the message names the key)."""


@dataclass
class RopeSection:
    """Rope/YaRN the run trains with; must equal the checkpoint's unless `model.rope_override`."""

    type: str = "rope"
    theta: float = 1e8
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    llama4_scaling_beta: float | None = None


@dataclass
class LoraSection:
    """LoRA adapters (W + alpha/rank B A, every base weight frozen); README: LoRA."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # from checkpoint.lora.TARGETS


@dataclass
class ModelSection:
    checkpoint: str = "???"  # torch_dist checkpoint directory with metadata (converted or merged model)
    tokenizer: str | None = None  # tekken.json; default: the checkpoint's own
    rope: RopeSection | None = None  # None: take the checkpoint's rope metadata as it is
    rope_override: bool = False  # train with `rope` even if the checkpoint metadata disagrees or lacks it
    verify: bool = True  # compare the checkpoint's files with their recorded sha256 on load (false: --no-verify)
    freeze_encoder: bool = True
    freeze_projector: bool = False
    transformer_impl: str = "auto"  # auto | local | transformer_engine
    gradient_accumulation_fusion: str = "auto"  # auto (on with TE on GPU and Apex's wgrad kernel) | on | off
    encoder_parallel: str = "split"  # split: encoder heads over TP ranks | replicate: whole frozen encoder per rank
    lora: LoraSection | None = None  # None: full SFT; set: train LoRA adapters only


@dataclass
class ParallelSection:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1  # decoder layers split in stages; encoder + projector on the first
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    distributed_timeout_minutes: float = 10.0  # a collective waiting longer fails the run (NCCL / gloo)


@dataclass
class OptimizerSection:
    lr: float = 1e-6
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.8
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 20.0
    warmup_steps: int = 100
    decay_style: str = "cosine"  # cosine | linear | constant
    decay_steps: int | None = None  # None: train_iters


@dataclass
class SourceSection:
    name: str = "???"
    path: str = "???"
    format: str = "jsonl"  # jsonl | energon
    ratio: float = 1.0
    epochs: float | None = None  # share of the source the run may use; None = cycle forever
    modality: str = "text"  # text | audio: counted as such in the text:audio ratio


@dataclass
class DataSection:
    sources: list[SourceSection] = field(default_factory=list)
    validation: list[SourceSection] = field(default_factory=list)
    shuffle_buffer: int = 16
    overlong: str = "truncate"  # truncate | drop documents longer than seq_length
    system_prompt_with_audio: str = "merge"  # merge into the first user turn | error
    num_workers: int = 0  # encoding worker processes per training process (0: encode in the training loop)
    prefetch: int = 64  # documents encoded ahead per sequence stream (with num_workers > 0)


@dataclass
class TrainingSection:
    seq_length: int = 131072
    micro_batch_size: int = 1
    global_batch_size: int = 32  # sequences per step (32 x 131072 ~ 4.2M tokens)
    train_iters: int = 1000
    seed: int = 1234
    bf16: bool = True
    fp8: str | None = None  # None | hybrid | e4m3 (Transformer Engine on GPU only)
    recompute: str = "none"  # none | full | selective
    loss_chunk_tokens: int = 4096  # supervised tokens per LM-head/cross-entropy chunk
    exit_after_iters: int | None = None  # stop early (the schedule still spans train_iters)
    profile_steps: list[int] | None = None  # [first, last]: torch.profiler trace per rank over these steps


@dataclass
class CheckpointSection:
    save_dir: str | None = None
    save_interval: int = 100
    keep_last: int = 3
    async_save: bool = False
    resume: bool = True  # continue from the newest checkpoint in save_dir if there is one


@dataclass
class LoggingSection:
    tensorboard_dir: str | None = None
    log_interval: int = 1
    eval_interval: int = 0  # 0 = never
    eval_iters: int = 1
    wandb_project: str | None = None  # set: W&B logs the TensorBoard scalars too (WANDB_MODE=offline: no network)
    wandb_run_name: str | None = None  # None: W&B picks one
    wandb_dir: str | None = None  # None: checkpoint.save_dir, else logging.tensorboard_dir


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


_ABSENT = object()
# YAML 1.1 reads `on`/`off`/`true`/`false` as booleans, which a str field then holds as "True"/"False".
_YAML_SWITCH = {"True": "on", "False": "off"}

CHOICES: dict[str, tuple[Any, ...]] = {
    "model.transformer_impl": ("auto", "local", "transformer_engine"),
    "model.gradient_accumulation_fusion": ("auto", "on", "off"),
    "model.encoder_parallel": ("split", "replicate"),
    "optimizer.decay_style": ("cosine", "linear", "constant"),
    "data.overlong": ("truncate", "drop"),
    "data.system_prompt_with_audio": ("merge", "error"),
    "training.fp8": (None, "hybrid", "e4m3"),
    "training.recompute": ("none", "full", "selective"),
}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Schema <- YAML <- `a.b=value` overrides, validated; raises TrainConfigError naming the key."""
    try:
        cfg = OmegaConf.structured(TrainConfig)
        if path is not None:
            if not Path(path).is_file():
                raise TrainConfigError(f"{path}: config file not found")
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, DictConfig):
                raise TrainConfigError(f"{path}: holds a YAML {type(loaded).__name__}, not a mapping of sections")
            cfg = OmegaConf.merge(cfg, loaded)
        for override in overrides:
            key, sep, value = override.partition("=")
            if not sep or not key:
                raise TrainConfigError(f"override {override!r}: expected key=value")
            if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
                raise TrainConfigError(f"{key}: unknown setting (override {override!r})")
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise TrainConfigError(f"{key}: value is not valid YAML ({str(exc).splitlines()[0]})") from None
            OmegaConf.update(cfg, key, parsed, merge=True)
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise TrainConfigError(f"{missing[0]}: required setting is missing")
        obj: TrainConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        msg = str(exc).splitlines()[0]
        raise TrainConfigError(f"{key}: {msg}" if key else msg) from None
    fusion = obj.model.gradient_accumulation_fusion
    obj.model.gradient_accumulation_fusion = _YAML_SWITCH.get(fusion, fusion)
    validate(obj)
    return obj


def validate(cfg: TrainConfig) -> None:
    """Value checks omegaconf's types cannot express."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise TrainConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
    positive = {
        "training.seq_length": cfg.training.seq_length,
        "training.micro_batch_size": cfg.training.micro_batch_size,
        "training.global_batch_size": cfg.training.global_batch_size,
        "training.train_iters": cfg.training.train_iters,
        "training.loss_chunk_tokens": cfg.training.loss_chunk_tokens,
        "parallel.tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
        "parallel.pipeline_model_parallel_size": cfg.parallel.pipeline_model_parallel_size,
        "parallel.context_parallel_size": cfg.parallel.context_parallel_size,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "checkpoint.save_interval": cfg.checkpoint.save_interval,
        "logging.log_interval": cfg.logging.log_interval,
    }
    for key, value in positive.items():
        if value < 1:
            raise TrainConfigError(f"{key}: must be >= 1, got {value}")
    opt = cfg.optimizer
    ranges = {  # key: (value, what is allowed, check)
        "optimizer.lr": (opt.lr, "> 0", lambda v: v > 0),
        "optimizer.weight_decay": (opt.weight_decay, ">= 0", lambda v: v >= 0),
        "optimizer.adam_beta1": (opt.adam_beta1, "in [0, 1)", lambda v: 0 <= v < 1),
        "optimizer.adam_beta2": (opt.adam_beta2, "in [0, 1)", lambda v: 0 <= v < 1),
        "optimizer.adam_eps": (opt.adam_eps, "> 0", lambda v: v > 0),
        "optimizer.clip_grad": (opt.clip_grad, ">= 0", lambda v: v >= 0),
    }
    for key, (value, allowed, ok) in ranges.items():
        if not (math.isfinite(value) and ok(value)):
            raise TrainConfigError(f"{key}: must be a finite number {allowed}, got {value}")
    if opt.warmup_steps < 0:
        raise TrainConfigError(f"optimizer.warmup_steps: must be >= 0, got {opt.warmup_steps}")
    if not 0 <= cfg.optimizer.min_lr_ratio <= 1:
        raise TrainConfigError(f"optimizer.min_lr_ratio: must be in [0, 1], got {cfg.optimizer.min_lr_ratio}")
    decay = cfg.optimizer.decay_steps or cfg.training.train_iters
    if cfg.optimizer.warmup_steps >= decay:
        raise TrainConfigError(
            f"optimizer.warmup_steps={cfg.optimizer.warmup_steps} must be below the decay "
            f"steps ({decay}: optimizer.decay_steps, else training.train_iters)"
        )
    if cfg.data.num_workers < 0:
        raise TrainConfigError(f"data.num_workers: must be >= 0, got {cfg.data.num_workers}")
    if cfg.data.prefetch < 1:
        raise TrainConfigError(f"data.prefetch: must be >= 1, got {cfg.data.prefetch}")
    if not cfg.data.sources:
        raise TrainConfigError("data.sources: at least one training source is required")
    for group in ("sources", "validation"):
        names = [s.name for s in getattr(cfg.data, group)]
        for i, src in enumerate(getattr(cfg.data, group)):
            where = f"data.{group}[{i}]"
            if src.format not in ("jsonl", "energon"):
                raise TrainConfigError(f"{where}.format: {src.format!r} is not 'jsonl' or 'energon'")
            if src.modality not in ("text", "audio"):
                raise TrainConfigError(f"{where}.modality: {src.modality!r} is not 'text' or 'audio'")
            if not math.isfinite(src.ratio) or src.ratio < 0:
                raise TrainConfigError(f"{where}.ratio: must be >= 0, got {src.ratio}")
            if src.epochs is not None and not (math.isfinite(src.epochs) and src.epochs > 0):
                raise TrainConfigError(f"{where}.epochs: must be > 0 or null, got {src.epochs}")
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise TrainConfigError(f"data.{group}: duplicate source name {sorted(dupes)[0]!r}")
    if not any(s.ratio > 0 for s in cfg.data.sources):
        raise TrainConfigError("data.sources: every ratio is 0")
    _validate_observability(cfg)
    _validate_wandb(cfg)
    if cfg.parallel.sequence_parallel and cfg.parallel.tensor_model_parallel_size == 1:
        raise TrainConfigError("parallel.sequence_parallel: needs tensor_model_parallel_size > 1")
    _validate_context_parallel(cfg)
    if cfg.model.encoder_parallel == "replicate" and not cfg.model.freeze_encoder:
        raise TrainConfigError(
            "model.encoder_parallel=replicate: needs model.freeze_encoder=true (a trainable copy of the encoder "
            "per TP rank would need its gradients reduced over TP)"
        )
    if cfg.model.rope_override and cfg.model.rope is None:
        raise TrainConfigError("model.rope_override: true needs a model.rope section")
    if cfg.model.rope is not None:
        rope_config(cfg.model.rope)
    if cfg.model.lora is not None:
        _validate_lora(cfg)


def _validate_lora(cfg: TrainConfig) -> None:
    """model.lora's values, and the settings LoRA cannot train with."""
    lora = cfg.model.lora
    if lora.rank < 1:
        raise TrainConfigError(f"model.lora.rank: must be >= 1, got {lora.rank}")
    if not (math.isfinite(lora.alpha) and lora.alpha > 0):
        raise TrainConfigError(f"model.lora.alpha: must be a finite number > 0, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise TrainConfigError(f"model.lora.dropout: must be in [0, 1), got {lora.dropout}")
    if not lora.targets:
        raise TrainConfigError(f"model.lora.targets: needs at least one of {', '.join(TARGETS)}")
    for t in lora.targets:
        if t not in TARGETS:
            raise TrainConfigError(f"model.lora.targets: unknown target {t!r} (allowed: {', '.join(TARGETS)})")
    if len(set(lora.targets)) != len(lora.targets):
        raise TrainConfigError(f"model.lora.targets: lists a target twice ({lora.targets})")
    if not cfg.model.freeze_encoder:
        raise TrainConfigError("model.freeze_encoder: false trains the encoder's weights, which model.lora freezes")
    if cfg.model.freeze_projector and "projector" in lora.targets:
        raise TrainConfigError("model.freeze_projector: true contradicts model.lora.targets listing 'projector'")
    if cfg.model.transformer_impl == "transformer_engine":
        raise TrainConfigError(
            "model.lora: adapters wrap Megatron-Core's local linears; set model.transformer_impl: local "
            "(Transformer Engine's fused layernorm-linear hides the normalised input an adapter needs)"
        )


def _validate_context_parallel(cfg: TrainConfig) -> None:
    """CP > 1 cuts every packed document into 2 x cp slices: the packed length must split the same way (and,
    with sequence parallelism, each rank's share over the TP ranks)."""
    cp, tp = cfg.parallel.context_parallel_size, cfg.parallel.tensor_model_parallel_size
    seq = cfg.training.seq_length
    if cp > 1 and seq % (2 * cp):
        raise TrainConfigError(
            f"training.seq_length={seq}: context_parallel_size={cp} cuts every packed document into 2 x cp = "
            f"{2 * cp} slices; needs a multiple of {2 * cp}"
        )
    if cp > 1 and cfg.parallel.sequence_parallel and (seq // cp) % tp:
        raise TrainConfigError(
            f"training.seq_length={seq}: each CP rank's {seq // cp} positions do not split over "
            f"tensor_model_parallel_size={tp} for sequence parallelism; needs a multiple of {math.lcm(2 * cp, cp * tp)}"
        )


def _validate_observability(cfg: TrainConfig) -> None:
    """The distributed timeout and the profiler step range."""
    timeout = cfg.parallel.distributed_timeout_minutes
    if not (math.isfinite(timeout) and timeout > 0):
        raise TrainConfigError(f"parallel.distributed_timeout_minutes: must be a finite number > 0, got {timeout}")
    steps = cfg.training.profile_steps
    if steps is not None:
        if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
            raise TrainConfigError(
                f"training.profile_steps: must be [first, last] with 1 <= first <= last, got {steps}"
            )
        if not (cfg.checkpoint.save_dir or cfg.logging.tensorboard_dir):
            raise TrainConfigError("training.profile_steps: needs checkpoint.save_dir or logging.tensorboard_dir")


_WANDB_PROJECT_FORBIDDEN = set("/\\#?%:")  # W&B refuses these in a project name (and more than 128 characters)


def _validate_wandb(cfg: TrainConfig) -> None:
    """The W&B keys: a project name W&B accepts, somewhere to write the run, the other keys only with a project."""
    log = cfg.logging
    if log.wandb_project is None:
        for key in ("wandb_run_name", "wandb_dir"):
            if getattr(log, key) is not None:
                raise TrainConfigError(f"logging.{key}: needs logging.wandb_project")
        return
    if (
        not log.wandb_project.strip()
        or len(log.wandb_project) > 128
        or _WANDB_PROJECT_FORBIDDEN & set(log.wandb_project)
    ):
        raise TrainConfigError(
            f"logging.wandb_project: {log.wandb_project!r} is not a W&B project name "
            "(1 to 128 characters, none of / \\ # ? % :)"
        )
    if wandb_dir(cfg) is None:
        raise TrainConfigError(
            "logging.wandb_project: needs logging.wandb_dir, checkpoint.save_dir or logging.tensorboard_dir"
        )


def wandb_dir(cfg: TrainConfig) -> str | None:
    """Where the W&B run is written (under `wandb/` there): logging.wandb_dir, else save_dir, else tensorboard_dir."""
    return cfg.logging.wandb_dir or cfg.checkpoint.save_dir or cfg.logging.tensorboard_dir


def rope_config(section: RopeSection) -> RopeConfig:
    """The `RopeConfig` a rope section describes (YaRN needs every field; checked by RopeConfig)."""
    try:
        return RopeConfig(**vars(section))
    except ValueError as exc:
        raise TrainConfigError(f"model.rope: {exc}") from None


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved configuration as YAML (saved next to checkpoints and TensorBoard logs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
