"""Startup refusals: each returns the model config to train with or raises a one-line `StartupError`.

The paper lost SWE-Bench points by training the merged model without its YaRN settings, so the rope
in the checkpoint metadata must exist and equal the run's (unless explicitly overridden); the rest are
layout limits of the audio model (TP must divide the decoder's KV groups, and the Whisper heads unless the
encoder is replicated; CP > 1 needs Transformer Engine's attention) and tokenizer/checkpoint consistency.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.megatron_lm import resolve
from megatron_ext.checkpoint.metadata import CheckpointMeta, read_meta, sha256_file
from megatron_ext.config import ConfigError, ModelConfig
from megatron_ext.errors import ProjectError
from megatron_ext.parallel_layout import EncoderHeadsError, validate_parallelism
from megatron_ext.training.config import TrainConfig, rope_config


class StartupError(ProjectError, RuntimeError):
    """The run cannot start with this configuration/checkpoint (one line naming the setting)."""


def read_checkpoint_meta(directory: str | Path) -> CheckpointMeta:
    """The checkpoint's metadata; a missing rope section is refused (by `read_meta`) as a StartupError."""
    try:
        return read_meta(Path(directory))
    except CheckpointError as exc:
        raise StartupError(str(exc)) from None


def resolve_rope(cfg: TrainConfig, meta: CheckpointMeta) -> ModelConfig:
    """The checkpoint's model config with the run's rope; refuses a disagreement unless overridden."""
    model = meta.model
    if cfg.model.rope is None:
        return model
    wanted = rope_config(cfg.model.rope)
    have = model.decoder.rope
    if wanted != have and not cfg.model.rope_override:
        diff = [f.name for f in dataclasses.fields(wanted) if getattr(wanted, f.name) != getattr(have, f.name)]
        raise StartupError(
            f"model.rope disagrees with {cfg.model.checkpoint} metadata on {', '.join(diff)} "
            f"(config {', '.join(f'{k}={getattr(wanted, k)}' for k in diff)}; checkpoint "
            f"{', '.join(f'{k}={getattr(have, k)}' for k in diff)}); "
            "set model.rope_override=true to train with the config's"
        )
    return dataclasses.replace(model, decoder=dataclasses.replace(model.decoder, rope=wanted))


def check_parallel_layout(cfg: TrainConfig, model: ModelConfig, backend: str | None = None) -> None:
    """The layout rules of `validate_parallelism`; `backend` None (a dry run away from the GPUs) leaves the
    attention backend's own limits (CP needs TE) to the run's start."""
    p = cfg.parallel
    try:
        validate_parallelism(
            model,
            tp=p.tensor_model_parallel_size,
            cp=p.context_parallel_size,
            pp=p.pipeline_model_parallel_size,
            backend=backend,
            encoder_parallel=cfg.model.encoder_parallel,
        )
    except EncoderHeadsError as exc:
        raise StartupError(
            f"parallel: {exc}, or model.encoder_parallel=replicate (a copy of the frozen encoder per TP rank)"
        ) from None
    except ConfigError as exc:
        raise StartupError(f"parallel: {exc}") from None


def gradient_accumulation_fusion(setting: str, backend: str, on_gpu: bool, apex_wgrad: bool) -> bool:
    """Whether the linears accumulate weight gradients straight into Megatron's fp32 main_grad buffers.

    Needs Transformer Engine's linears on a GPU, and Apex's `fused_weight_gradient_mlp_cuda` too: GPTModel's
    LM head is Megatron's own ColumnParallelLinear, which refuses the flag without it. 'auto' turns it on
    exactly then; 'on' elsewhere is refused."""
    available = backend == "te" and on_gpu and apex_wgrad
    if setting == "on" and not available:
        missing = (
            "Transformer Engine on a GPU" if backend != "te" or not on_gpu else "Apex's fused_weight_gradient_mlp_cuda"
        )
        raise StartupError(
            f"model.gradient_accumulation_fusion=on: needs {missing} (backend {backend}); use auto or off"
        )
    return available and setting != "off"


def check_tokenizer(tokenizer_path: Path, meta: CheckpointMeta, checkpoint: str) -> None:
    if meta.tokenizer_sha256 is None:
        raise StartupError(f"{checkpoint}: checkpoint metadata records no tokenizer sha256")
    got = sha256_file(tokenizer_path)
    if got != meta.tokenizer_sha256:
        raise StartupError(
            f"{tokenizer_path}: sha256 {got[:12]}... differs from the checkpoint's tokenizer "
            f"{meta.tokenizer_sha256[:12]}... ({checkpoint})"
        )


def check_wandb_installed(cfg: TrainConfig) -> None:
    """W&B is optional: with logging.wandb_project set, every rank refuses to start without the package (rank 0
    imports it only when it logs)."""
    if cfg.logging.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise StartupError(
            f"logging.wandb_project={cfg.logging.wandb_project}: the wandb package is not installed "
            "(pip install -r requirements-wandb.txt, or unset logging.wandb_project)"
        )


def startup_checks(cfg: TrainConfig, backend: str | None = None) -> tuple[ModelConfig, CheckpointMeta, Path]:
    """Run every refusal (`backend`: the attention backend the run uses, None if not known here); returns
    (model config to train, checkpoint metadata, tokenizer path)."""
    check_wandb_installed(cfg)
    meta = read_checkpoint_meta(cfg.model.checkpoint)
    model = resolve_rope(cfg, meta)
    check_parallel_layout(cfg, model, backend)
    tokenizer = (
        Path(cfg.model.tokenizer) if cfg.model.tokenizer else resolve(Path(cfg.model.checkpoint)) / "tekken.json"
    )
    if not tokenizer.is_file():
        raise StartupError(f"{tokenizer}: tokenizer file not found")
    check_tokenizer(tokenizer, meta, cfg.model.checkpoint)
    return model, meta, tokenizer
