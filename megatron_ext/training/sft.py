"""Supervised fine-tuning of the audio language model on Megatron-Core, readable top to bottom.

`train(cfg)`: start gloo/NCCL and Megatron's parallel state -> refuse bad setups (`checks`) -> build the
model (encoder frozen), load the start checkpoint -> Megatron DDP, `get_megatron_optimizer` (distributed
optimizer), `OptimizerParamScheduler` (warmup + cosine to min-lr ratio) -> resume from the newest
checkpoint in save_dir if any -> loop: one global batch through `get_forward_backward_func`
(micro-batches from `num_microbatches_calculator`), optimizer step, scheduler step, periodic validation and
checkpoints, TensorBoard (and optional W&B) scalars with per-phase timers (`timers`). SIGUSR1/SIGTERM stop the
run after a save at the next step boundary (`signals`); `training.profile_steps` traces a step range
(`profiling`). The loss (one `loss_func`) is the mean cross entropy over the global batch's supervised
(assistant) tokens, computed chunk by chunk (see `loss.py`). Under context parallelism (TE only) every CP rank
packs the same sequences (documents padded to multiples of 2 x cp), keeps its slices of each document in
Megatron-Core's load-balanced order and encodes only the audio chunks those need (`models/cp_audio.py`).
With `model.lora` every base weight is frozen
and LoRA adapters (`models/lora.py`) on the targeted linears are all the optimizer sees; checkpoints then
hold the adapters, not the base (`checkpointing.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    get_num_microbatches,
    init_num_microbatches_calculator,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from tqdm import tqdm

from megatron_ext.audio.features import audio_tokens_per_chunk, log_mel_chunks
from megatron_ext.checkpoint.lora import AdapterConfig, base_fingerprint
from megatron_ext.checkpoint.metadata import CheckpointMeta, command_line
from megatron_ext.checkpoint.torch_dist_io import TorchDistReader
from megatron_ext.compat.cpu import destroy_distributed, init_distributed
from megatron_ext.config import ModelConfig
from megatron_ext.data.chat import ChatEncoder, load_tokenizer
from megatron_ext.data.loader import SFTData
from megatron_ext.data.packing import document_causal_mask
from megatron_ext.data.sources import open_source
from megatron_ext.models.build import BuildConfig, FP8Config, build_model
from megatron_ext.models.cp_audio import partition_index
from megatron_ext.models.loading import load_full_tensors
from megatron_ext.models.lora import apply_lora, parameter_counts
from megatron_ext.models.specs import resolve_backend
from megatron_ext.models.tokens import check_audio_token
from megatron_ext.training.checkpointing import Checkpointer, iter_dir, latest_checkpoint
from megatron_ext.training.checks import StartupError, gradient_accumulation_fusion, startup_checks
from megatron_ext.training.config import TrainConfig, to_yaml
from megatron_ext.training.loss import supervised_token_losses
from megatron_ext.training.metrics import Sinks, TensorBoard, WandB, step_flops
from megatron_ext.training.pipeline import from_last_stage, schedule_shape
from megatron_ext.training.profiling import StepProfiler
from megatron_ext.training.signals import StopSignal
from megatron_ext.training.timers import StepTimers, log_text, over_ranks

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    """What a run did: per-step training loss (global mean over supervised tokens) and validation losses."""

    losses: dict[int, float]
    validation: dict[int, float]
    resumed_from: int | None
    trainable: list[str] = dataclasses.field(default_factory=list)  # parameter names the optimizer updates
    frozen: list[str] = dataclasses.field(default_factory=list)
    trainable_numel: int = 0
    optimizer_state_numel: int = 0  # this DP group's Adam exp_avg elements (= trainable numel on this TP rank)
    stopped_by: str | None = None  # the signal (SIGUSR1 / SIGTERM) that stopped the run after a save
    timings: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # this rank's phases per step


# ---- model / optimizer -------------------------------------------------------------------------------
def _backend(cfg: TrainConfig) -> str:
    """The attention backend this run uses: te or local."""
    return resolve_backend({"auto": "auto", "local": "local", "transformer_engine": "te"}[cfg.model.transformer_impl])


def _build(cfg: TrainConfig, model_cfg: ModelConfig) -> torch.nn.Module:
    """This pipeline stage's model (encoder + projector on the first), start weights loaded."""
    on_gpu = torch.cuda.is_available()
    backend = _backend(cfg)
    fusion = gradient_accumulation_fusion(
        cfg.model.gradient_accumulation_fusion,
        backend,
        on_gpu,
        importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None,
    )
    build = BuildConfig(
        backend=backend,
        params_dtype="bfloat16" if cfg.training.bf16 else "float32",
        sequence_parallel=cfg.parallel.sequence_parallel,
        freeze_encoder=cfg.model.freeze_encoder,
        freeze_projector=cfg.model.freeze_projector,
        encoder_parallel=cfg.model.encoder_parallel,
        fp8=FP8Config(format=cfg.training.fp8) if cfg.training.fp8 else None,
        init_weights=False,
        recompute_granularity=None if cfg.training.recompute == "none" else cfg.training.recompute,
        gradient_accumulation_fusion=fusion,
        extra={"calculate_per_token_loss": True},
    )
    model = build_model(model_cfg, build)
    if on_gpu:
        model.cuda(torch.cuda.current_device())
    reader = TorchDistReader(Path(cfg.model.checkpoint))
    try:
        load_full_tensors(model, reader.get)
    finally:
        reader.close()
    if cfg.model.lora is not None:
        _add_lora(cfg, model_cfg, model)
    return model


def _add_lora(cfg: TrainConfig, model_cfg: ModelConfig, model: torch.nn.Module) -> None:
    """Freeze the loaded model and wrap the targeted linears with adapters; log what trains."""
    lora = cfg.model.lora
    if model.backend != "local":
        raise StartupError(
            "model.lora: adapters wrap Megatron-Core's local linears, and this run resolved to Transformer Engine; "
            "set model.transformer_impl: local"
        )
    wrapped = apply_lora(model, lora.rank, lora.alpha, lora.dropout, list(lora.targets), cfg.training.seed)
    trainable, total = parameter_counts(model)
    if dist.get_rank() == 0:
        log.info(
            "LoRA rank %d alpha %g on %s (%d linears on this stage): %s trainable of %s parameters (%.3f%%)",
            lora.rank,
            lora.alpha,
            ", ".join(lora.targets),
            len(wrapped),
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / total,
        )


def _check_lora_targets(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """The targets exist in this model (the projector only with an audio stack)."""
    if cfg.model.lora is not None and "projector" in cfg.model.lora.targets and model_cfg.encoder is None:
        raise StartupError(f"model.lora.targets: 'projector', but {cfg.model.checkpoint} has no audio projector")


def _adapter_config(cfg: TrainConfig) -> AdapterConfig | None:
    """What the run's checkpoints record about their adapters (None without model.lora)."""
    lora = cfg.model.lora
    if lora is None:
        return None
    return AdapterConfig(
        rank=lora.rank,
        alpha=lora.alpha,
        targets=tuple(lora.targets),
        base_checkpoint=str(cfg.model.checkpoint),
        base_fingerprint=base_fingerprint(Path(cfg.model.checkpoint)),
        dropout=lora.dropout,
    )


def _optimizer(cfg: TrainConfig, ddp: DistributedDataParallel) -> tuple[Any, OptimizerParamScheduler]:
    o = cfg.optimizer
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.lr * o.min_lr_ratio,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=cfg.training.bf16,
            params_dtype=torch.bfloat16 if cfg.training.bf16 else torch.float32,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ),
        [ddp],
    )
    scheduler = OptimizerParamScheduler(
        opt,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=o.decay_steps or cfg.training.train_iters,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=cfg.training.train_iters,
        wd_incr_style="constant",
    )
    return opt, scheduler


# ---- one micro-batch -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _decoder_hidden_states(language_model: torch.nn.Module) -> Iterator[None]:
    """Make GPTModel.forward return the final-norm hidden states [s, b, h] instead of logits.

    The LM head then runs only on supervised tokens, in chunks (loss.py); GPTModel 0.16 has no flag for
    this, so its `_postprocess` is bypassed on this instance for the duration of the call.
    """
    language_model._postprocess = lambda hidden_states, **_: hidden_states
    try:
        yield
    finally:
        del language_model._postprocess


def _attention_inputs(
    batch: dict[str, Any], backend: str, cp: int
) -> tuple[torch.Tensor | None, PackedSeqParams | None]:
    """Per-document attention: THD cu_seqlens for Transformer Engine (under CP with each document's padded
    extent, which Megatron-Core cuts into 2 x cp slices), an explicit mask for the local spec."""
    if backend == "te":
        dev = torch.cuda.current_device()
        cu = batch["cu_seqlens"].to(dev)
        padded = batch["cu_seqlens_padded"].to(dev) if cp > 1 else None
        return None, PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            cu_seqlens_q_padded=padded,
            cu_seqlens_kv_padded=padded,
            max_seqlen_q=batch["max_seqlen"],
            max_seqlen_kv=batch["max_seqlen"],
        )
    return document_causal_mask(batch["doc_ids"]), None


_ROW_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "source_ids", "doc_ids")


def _device(batch: dict[str, Any]) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return batch
    dev = torch.cuda.current_device()
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _loss_func(batch: dict[str, Any], n_sources: int, token_losses: torch.Tensor):
    """(summed loss, supervised tokens, {name: [sum, count]}) -- Megatron's per-token loss protocol."""
    mask = batch["loss_mask"].reshape(-1)
    src = batch["source_ids"].reshape(-1)[mask.nonzero().squeeze(1)]
    total = token_losses.sum()
    per_source = torch.zeros(n_sources, 2, dtype=torch.float64, device=token_losses.device)
    per_source[:, 0].index_add_(0, src, token_losses.detach().double())
    per_source[:, 1].index_add_(0, src, torch.ones_like(src, dtype=torch.float64))
    count = torch.tensor(token_losses.numel(), dtype=torch.int, device=token_losses.device)
    return total, count, {"lm": torch.stack([total.detach().double(), count.double()]), "sources": per_source}


def _forward_step(cfg: TrainConfig, n_sources: int, data_iterator: Iterator[dict[str, Any]], model: torch.nn.Module):
    """One micro-batch through this stage: audio encoded on the first, the loss on the last (else the hidden
    states go to the next stage)."""
    batch = _device(next(data_iterator))
    core = model.module if isinstance(model, DistributedDataParallel) else model
    cp = parallel_state.get_context_parallel_world_size()
    attention_mask, packed = _attention_inputs(batch, core.backend, cp)
    if packed is not None:  # THD: all rows of the micro-batch are one flat token stream ([1, b*s])
        batch = {k: v.reshape(1, -1) if k in _ROW_KEYS else v for k, v in batch.items()}
    tokens, cp_index = batch["tokens"], None
    if cp > 1:  # this CP rank's slices; the model takes the whole stream to find the audio chunks they need
        cp_index = partition_index(batch["cu_seqlens_padded"], cp, parallel_state.get_context_parallel_rank())
        cp_index = cp_index.to(tokens.device)
        batch = {k: v[:, cp_index] if k in _ROW_KEYS else v for k, v in batch.items()}
    mel = batch["mel"] if core.pre_process else None
    if mel is not None:
        mel = mel.to(next(core.parameters()).dtype)
    with _decoder_hidden_states(core.language_model):
        hidden = model(
            tokens,
            batch["position_ids"],
            attention_mask,
            audio_features=mel,
            packed_seq_params=packed,
            cp_index=cp_index,
        )
    if not core.post_process:
        return hidden, partial(_loss_func, batch, n_sources)  # the schedule sends `hidden` on; no loss here
    losses = supervised_token_losses(
        hidden,
        core.language_model.output_layer.weight,
        batch["labels"],
        batch["loss_mask"],
        cfg.training.loss_chunk_tokens,
        core.config.sequence_parallel,
    )
    return losses, partial(_loss_func, batch, n_sources)


def _p2p_shape(cfg: TrainConfig, ddp: DistributedDataParallel) -> dict[str, int]:
    """The schedule's seq_length/micro_batch_size arguments (they size the activations sent between stages)."""
    seq, mbs = schedule_shape(cfg.training.seq_length, cfg.training.micro_batch_size, ddp.module.backend == "te")
    return {"seq_length": seq, "micro_batch_size": mbs}


def _reduce(outputs: list[dict[str, torch.Tensor]], n_sources: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum [loss, tokens] and per-source [loss, tokens] over micro-batches and data- and context-parallel ranks
    (each CP rank holds its slices' losses); every pipeline stage gets the last stage's sums (the only one with
    outputs)."""
    lm = torch.zeros(2, dtype=torch.float64)
    sources = torch.zeros(n_sources, 2, dtype=torch.float64)
    for out in outputs:
        lm += out["lm"].cpu()
        sources += out["sources"].cpu()
    packed = torch.cat([lm, sources.reshape(-1)])
    if torch.cuda.is_available():
        packed = packed.cuda()
    dist.all_reduce(packed, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    packed = from_last_stage(packed).cpu()
    return packed[:2], packed[2:].reshape(n_sources, 2)


def _batch_counts(batches: list[dict[str, Any]], audio_token_id: int | None) -> dict[str, int]:
    """Token bookkeeping for this rank's batches (documents, padding excluded)."""
    tokens = sum(int((b["source_ids"] >= 0).sum()) for b in batches)
    audio = (
        sum(int(((b["tokens"] == audio_token_id) & (b["source_ids"] >= 0)).sum()) for b in batches)
        if audio_token_id is not None
        else 0
    )
    sup = sum(int(b["loss_mask"].sum()) for b in batches)
    chunks = sum(b["num_audio_chunks"] for b in batches)
    return {"tokens": tokens, "audio": audio, "supervised": sup, "chunks": chunks}


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


# ---- the run -------------------------------------------------------------------------------------------
def _check_batch_layout(t: Any, dp: int) -> None:
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise StartupError(
            f"training.global_batch_size={t.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel size = {t.micro_batch_size * dp}"
        )


def _chat_encoder(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer_path: Path) -> ChatEncoder:
    """Tokenizer + audio layout of this model: [AUDIO] tokens per 30 s chunk = encoder frames / stack."""
    per_chunk = (
        audio_tokens_per_chunk(model_cfg.encoder.max_source_positions, model_cfg.projector_stack)
        if model_cfg.encoder is not None
        else None
    )
    return ChatEncoder(
        load_tokenizer(tokenizer_path), per_chunk, model_cfg.audio_token_id, cfg.data.system_prompt_with_audio
    )


def train(cfg: TrainConfig) -> TrainResult:
    """Run SFT as configured (call under torchrun for several ranks); returns the losses seen."""
    p = cfg.parallel
    with StopSignal() as stop:  # from the start: a signal during startup stops after the first step
        init_distributed(
            tp=p.tensor_model_parallel_size,
            pp=p.pipeline_model_parallel_size,
            cp=p.context_parallel_size,
            seed=cfg.training.seed,
            timeout_minutes=p.distributed_timeout_minutes,
        )
        try:
            return _train(cfg, stop)
        finally:
            destroy_num_microbatches_calculator()
            destroy_distributed()


def _train(cfg: TrainConfig, stop: StopSignal) -> TrainResult:
    t = cfg.training
    rank = dist.get_rank()
    model_cfg, meta, tokenizer_path = startup_checks(cfg, _backend(cfg))
    model_cfg = check_audio_token(model_cfg, tokenizer_path)
    _check_lora_targets(cfg, model_cfg)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    _check_batch_layout(t, dp)
    init_num_microbatches_calculator(rank, None, t.global_batch_size, t.micro_batch_size, dp)

    model = _build(cfg, model_cfg)
    if rank == 0 and cfg.training.fp8 and model.backend != "te":
        log.warning("training.fp8=%s is OFF: the local (CPU) spec has no FP8; it needs Transformer Engine", t.fp8)
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ),
        model,
    )
    optimizer, scheduler = _optimizer(cfg, ddp)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = optimizer.scale_loss
    model.config.no_sync_func = ddp.no_sync

    encoder = _chat_encoder(cfg, model_cfg, tokenizer_path)
    mel = (
        (lambda wave: log_mel_chunks(wave, model_cfg.encoder.mel_frames)[0]) if model_cfg.encoder is not None else None
    )
    data = SFTData(
        cfg.data,
        t.seq_length,
        t.seed,
        encoder,
        mel,
        dp_rank,
        dp,
        num_streams=t.global_batch_size,
        group=parallel_state.get_data_parallel_group(),
        doc_multiple=2 * cfg.parallel.context_parallel_size if cfg.parallel.context_parallel_size > 1 else 1,
    )
    n_sources = len(data.source_names)

    adapters = _adapter_config(cfg)

    def sft_meta() -> CheckpointMeta:
        return CheckpointMeta(
            model=model_cfg,
            tokenizer_sha256=meta.tokenizer_sha256,
            command=command_line(),
            tool="sft",
            sources=[{"path": cfg.model.checkpoint}],
            extra={"sft_config": to_yaml(cfg), **({"lora": adapters.to_dict()} if adapters else {})},
        )

    resolved = to_yaml(cfg)  # in every checkpoint (config.yaml), in TensorBoard and as the W&B run's config
    ckpt = Checkpointer(
        cfg.checkpoint.save_dir,
        cfg.checkpoint.keep_last,
        cfg.checkpoint.async_save,
        sft_meta,
        tokenizer_path,
        config_yaml=resolved,
        lora=adapters,
    )
    start, resumed_from = 0, None
    resume = latest_checkpoint(cfg.checkpoint.save_dir) if cfg.checkpoint.resume else None
    if resume is not None:
        extra = Checkpointer.load(resume, model, optimizer, scheduler, adapters)
        data.load_state_dict(extra["data"])
        start = resumed_from = extra["step"]
        if rank == 0:
            log.info("resumed from %s (step %d)", resume, start)

    tensorboard = TensorBoard(cfg.logging.tensorboard_dir, rank)
    tensorboard.text("config", resolved)
    board = Sinks(tensorboard, WandB(cfg, rank))
    timers = StepTimers()
    profiler = StepProfiler(t.profile_steps, cfg.checkpoint.save_dir or cfg.logging.tensorboard_dir, rank)
    forward_backward = get_forward_backward_func()
    step_fn = partial(_forward_step, cfg, n_sources)
    result = TrainResult({}, {}, resumed_from)
    last = min(t.train_iters, t.exit_after_iters or t.train_iters)
    for step in range(start + 1, last + 1):
        profiler.begin(step)
        timers.start_step()
        started = time.perf_counter()
        try:
            with timers.phase("data"):
                batches = data.step_batches(get_num_microbatches(), t.micro_batch_size)
        except StopIteration:
            if rank == 0:
                log.info("data exhausted after step %d", step - 1)
            break
        with timers.phase("forward_backward"):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            outputs = forward_backward(
                forward_step_func=step_fn,
                data_iterator=iter(batches),
                model=[ddp],
                num_microbatches=len(batches),
                **_p2p_shape(cfg, ddp),
                forward_only=False,
            )
            lm, per_source = _reduce(outputs, n_sources)
        with timers.phase("optimizer"):
            _, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
        loss = float(lm[0] / lm[1].clamp(min=1))
        result.losses[step] = loss
        elapsed = time.perf_counter() - started

        if cfg.logging.eval_interval and (step % cfg.logging.eval_interval == 0 or step == last):
            with timers.phase("validation"):
                val = _validate(cfg, data, ddp, forward_backward, step_fn, n_sources)
                if val is not None:
                    result.validation[step] = val
                    board.scalars(step, {"val/loss": val})
        with timers.phase("checkpoint"):
            result.stopped_by = stop.agreed()
            if cfg.checkpoint.save_dir and (
                step % cfg.checkpoint.save_interval == 0 or step == last or result.stopped_by
            ):
                ckpt.save(step, model, optimizer, scheduler, {"data": data.state_dict(), "step": step})
            ckpt.poll()
        result.timings[step] = timers.end_step()
        profiler.end(step)

        if step % cfg.logging.log_interval == 0 or step == last or result.stopped_by:
            phases = over_ranks(result.timings[step])
            counts = _batch_counts(batches, model_cfg.audio_token_id)
            totals = torch.tensor([counts["tokens"], counts["audio"], counts["supervised"]], dtype=torch.float64)
            doc_lens = [n for b in batches for n in b["doc_lengths"]]
            flops = torch.tensor(
                [
                    step_flops(
                        model_cfg,
                        doc_lens,
                        counts["supervised"],
                        counts["chunks"],
                        not cfg.model.freeze_encoder,
                        not cfg.model.freeze_projector,
                    )
                ],
                dtype=torch.float64,
            )
            both = torch.cat([totals, flops])
            both = both.cuda() if torch.cuda.is_available() else both
            dist.all_reduce(both, group=parallel_state.get_data_parallel_group())
            tokens, audio, supervised, total_flops = both.cpu().tolist()
            world = dist.get_world_size()
            scalars = {
                "train/loss": loss,
                "train/lr": scheduler.get_lr(optimizer.param_groups[0]),
                "train/grad_norm": float(grad_norm or 0.0),
                "train/tokens_per_s": tokens / elapsed,
                "train/tflops_per_gpu": total_flops / elapsed / world / 1e12,
                "train/memory_gb": _memory_gb(),
                "train/audio_tokens": audio,
                "train/text_tokens": tokens - audio,
                "train/supervised_tokens": supervised,
                **{f"timers/{name}_s": seconds for name, seconds in phases.items()},
            }
            for i, name in enumerate(data.source_names):
                if per_source[i, 1] > 0:
                    scalars[f"train/loss_{name}"] = float(per_source[i, 0] / per_source[i, 1])
            board.scalars(step, scalars)
            if rank == 0:
                log.info(
                    "step %d/%d loss %.5f lr %.3g grad-norm %.3f tokens/s %.0f | %s",
                    step,
                    t.train_iters,
                    loss,
                    scalars["train/lr"],
                    scalars["train/grad_norm"],
                    scalars["train/tokens_per_s"],
                    log_text(phases),
                )
        if result.stopped_by:
            if rank == 0:
                saved = (
                    f"saved {iter_dir(Path(cfg.checkpoint.save_dir), step)}"
                    if cfg.checkpoint.save_dir
                    else "no save_dir"
                )
                log.warning("%s received: stopping after step %d (%s)", result.stopped_by, step, saved)
            break
    profiler.close()
    ckpt.poll(blocking=True)
    ckpt.close()
    board.close()
    data.close()
    result.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    result.frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    result.trainable_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result.optimizer_state_numel = _optimizer_state_numel(optimizer)
    return result


def _optimizer_state_numel(optimizer: Any) -> int:
    """Elements of Adam's first moment held for this TP rank, summed over its data- (and context-) parallel shards."""
    n = sum(
        state["exp_avg"].numel()
        for opt in getattr(optimizer, "chained_optimizers", [optimizer])
        for state in opt.optimizer.state.values()
        if "exp_avg" in state
    )
    total = torch.tensor([n], dtype=torch.long, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return int(total.item())


def _validate(
    cfg: TrainConfig, data: SFTData, ddp: DistributedDataParallel, forward_backward, step_fn, n_sources: int
) -> float | None:
    """Mean loss over the fixed validation batches (no gradients)."""
    batches = data.validation_batches(cfg.logging.eval_iters, cfg.training.micro_batch_size)
    if not batches:
        return None
    ddp.eval()
    with torch.no_grad():
        outputs = forward_backward(
            forward_step_func=step_fn,
            data_iterator=iter(batches),
            model=[ddp],
            num_microbatches=len(batches),
            **_p2p_shape(cfg, ddp),
            forward_only=True,
        )
    ddp.train()
    lm, _ = _reduce(outputs, n_sources)
    return float(lm[0] / lm[1].clamp(min=1))


def dry_run(cfg: TrainConfig, world_size: int) -> list[str]:
    """Validate a run without starting it (no process group, no model): config, refusals, batch layout,
    and every sample of every data source encoded as training would. Returns a short summary; raises on the
    first problem."""
    t, p = cfg.training, cfg.parallel
    # the attention backend as far as it is known here (auto resolves on the training machines)
    model_cfg, _, tokenizer_path = startup_checks(
        cfg, {"local": "local", "transformer_engine": "te"}.get(cfg.model.transformer_impl)
    )
    model_cfg = check_audio_token(model_cfg, tokenizer_path)
    _check_lora_targets(cfg, model_cfg)
    pp = p.pipeline_model_parallel_size
    model_parallel = p.tensor_model_parallel_size * p.context_parallel_size * pp
    if world_size < 1:
        raise StartupError(f"world size {world_size}: must be >= 1")
    if world_size % model_parallel:
        sizes = "TP x CP" + (" x PP" if pp > 1 else "")
        raise StartupError(f"world size {world_size} is not a multiple of {sizes} = {model_parallel}")
    dp = world_size // model_parallel
    _check_batch_layout(t, dp)
    encoder = _chat_encoder(cfg, model_cfg, tokenizer_path)
    rope = model_cfg.decoder.rope
    lines = [
        f"model {cfg.model.checkpoint}: rope {rope.type} theta {rope.theta:g}"
        + (f" factor {rope.factor:g}" if rope.type == "yarn" else ""),
        f"layout: world {world_size} = TP {p.tensor_model_parallel_size} x "
        + (f"PP {pp} x " if pp > 1 else "")
        + f"CP {p.context_parallel_size} "
        f"x DP {dp}; {t.global_batch_size // (t.micro_batch_size * dp)} micro-batches of "
        f"{t.micro_batch_size} x {t.seq_length} tokens per rank; "
        f"{t.global_batch_size * t.seq_length / 1e6:.2f}M tokens per step",
    ]
    for group in (cfg.data.sources, cfg.data.validation):
        for s in group:
            source = open_source(s.path, s.format, s.name)
            doc = encoder.encode(source[0], s.name, source.where(0))
            for i in tqdm(range(1, len(source)), desc=f"checking {s.name}", unit="sample", leave=False):
                encoder.encode(source[i], s.name, source.where(i))  # training would refuse it at this step
            lines.append(
                f"source {s.name} ({s.format}, ratio {s.ratio:g}, epochs {s.epochs}): {len(source)} samples, "
                f"all valid; first has {len(doc)} tokens, {int(doc.loss_mask.sum())} supervised, "
                f"{len(doc.audio_chunks)} audio chunks"
            )
    return lines
