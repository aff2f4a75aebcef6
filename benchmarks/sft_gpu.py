"""A few SFT steps on a full-width slice of the real model (one GPU): tokens/s, model TFLOP/s, peak memory.

The slice has Mistral Small 3's full width (hidden 5120, 32 q / 8 KV heads x 128, SwiGLU 32768, vocab
131072, YaRN factor 48) with `layers` decoder layers, plus Whisper-large-v3-wide encoder layers and the
projector, randomly initialised. Each step runs the training loop's own pieces (`sft._forward_step`:
packed documents with per-document attention through Transformer Engine's THD path, audio spliced,
chunked supervised-token loss; Megatron DDP, distributed optimizer, `get_forward_backward_func`) in bf16,
with FP8 when asked. `plan()` describes the run without a GPU (what `--check` prints).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from megatron_ext.config import ConfigError, EncoderConfig, ModelConfig, RopeConfig, mistral_small_decoder
from megatron_ext.data.chat import EncodedDoc
from megatron_ext.data.packing import collate, pack
from megatron_ext.training.config import TrainConfig
from megatron_ext.training.metrics import step_flops

AUDIO_TOKEN_ID = 24
SAMPLES_PER_CHUNK = 16000 * 30


def slice_config(layers: int, encoder_layers: int) -> ModelConfig:
    """Full-width Devstral-Audio decoder/encoder with fewer layers."""
    rope = RopeConfig(
        theta=1e8,
        type="yarn",
        factor=48.0,
        original_max_position_embeddings=8192,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
    )
    decoder = mistral_small_decoder(layers, rope)
    if not encoder_layers:
        return ModelConfig(decoder, None, None, 4, "voxtral")
    encoder = EncoderConfig(num_layers=encoder_layers, hidden_size=1280, ffn_hidden_size=5120, num_attention_heads=20)
    return ModelConfig(decoder, encoder, AUDIO_TOKEN_ID, 4, "voxtral")


def synthetic_batch(seq_length: int, docs: int, audio_chunks: int, seed: int, vocab: int = 131072) -> dict[str, Any]:
    """One packed row: `docs` documents of random text tokens below `vocab` (second half supervised), the first
    one opening with `audio_chunks` x 375 [AUDIO] tokens, with 30 s noise chunks as audio."""
    rng = np.random.default_rng(seed)
    n = seq_length // docs + 1
    out = []
    for d in range(docs):
        tokens = rng.integers(min(1000, vocab // 2), vocab, n)
        tokens[0] = 1
        if d == 0 and audio_chunks:
            tokens[1 : 1 + 375 * audio_chunks] = AUDIO_TOKEN_ID
        mask = np.zeros(n, dtype=bool)
        mask[n // 2 :] = True
        chunks = [
            rng.standard_normal(SAMPLES_PER_CHUNK).astype(np.float32) * 0.1
            for _ in range(audio_chunks if d == 0 else 0)
        ]
        out.append(EncodedDoc(tokens, mask, chunks))
    return out


def plan(layers: int, encoder_layers: int, seq_length: int, docs: int, audio_chunks: int) -> dict[str, float]:
    """FLOPs per step and the loss-memory estimate of this slice (no GPU needed)."""
    cfg = slice_config(layers, encoder_layers)
    lens = [seq_length // docs] * docs
    supervised = seq_length // 2
    return {
        "tokens_per_step": seq_length,
        "model_tflop_per_step": step_flops(cfg, lens, supervised, audio_chunks) / 1e12,
        "full_logits_gb_tp1": seq_length * 131072 * 4 / 2**30,
        "chunked_loss_peak_gb_tp1": 3 * 4096 * 131072 * 4 / 2**30,
    }


def run(
    layers: int = 4,
    encoder_layers: int = 2,
    seq_length: int = 16384,
    docs: int = 4,
    audio_chunks: int = 1,
    steps: int = 5,
    warmup: int = 2,
    fp8: str | None = "hybrid",
    recompute: str | None = None,
    *,
    model_cfg: ModelConfig | None = None,
    fp8_recipe: str = "delayed",
    cpu: bool = False,
) -> dict[str, float]:
    """Train `warmup + steps` steps on one GPU; returns the measured figures of the last `steps`.

    `model_cfg` replaces the slice of `layers`/`encoder_layers`; `cpu` runs the same steps on CPU (local spec,
    fp32, no FP8) as a dry run of the code path with tiny shapes."""
    if not cpu and not torch.cuda.is_available():
        raise ConfigError("the GPU benchmark needs CUDA (use --check on CPU)")
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ext.audio.features import log_mel_chunks
    from megatron_ext.compat.cpu import destroy_distributed, init_distributed
    from megatron_ext.models.build import BuildConfig, FP8Config, build_model
    from megatron_ext.training import sft

    init_distributed(tp=1)
    try:
        model_cfg = model_cfg or slice_config(layers, encoder_layers)
        model = build_model(
            model_cfg,
            BuildConfig(
                backend="local" if cpu else "te",
                params_dtype="float32" if cpu else "bfloat16",
                fp8=FP8Config(format=fp8, recipe=fp8_recipe) if fp8 and not cpu else None,
                recompute_granularity=recompute,
                extra={"calculate_per_token_loss": True},
            ),
        )
        if not cpu:
            model.cuda()
            torch.cuda.reset_peak_memory_stats()
        cfg = TrainConfig()
        cfg.training = dataclasses.replace(
            cfg.training, seq_length=seq_length, train_iters=warmup + steps + 10, bf16=not cpu
        )
        cfg.optimizer = dataclasses.replace(cfg.optimizer, warmup_steps=1)
        ddp = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True), model
        )
        optimizer, scheduler = sft._optimizer(cfg, ddp)
        model.config.finalize_model_grads_func = finalize_model_grads
        model.config.grad_scale_func = optimizer.scale_loss
        mel = lambda wave: log_mel_chunks(wave)[0]  # noqa: E731
        documents = synthetic_batch(seq_length, docs, audio_chunks, 0, model_cfg.decoder.vocab_size)
        batch = collate([pack(documents, [0] * docs, seq_length, 11)], mel)
        forward_backward = get_forward_backward_func()
        step_fn = lambda it, m: sft._forward_step(cfg, 1, it, m)  # noqa: E731
        times = []
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            forward_backward(
                forward_step_func=step_fn,
                data_iterator=iter([batch]),
                model=[ddp],
                num_microbatches=1,
                seq_length=seq_length,
                micro_batch_size=1,
                forward_only=False,
            )
            optimizer.step()
            scheduler.step(increment=1)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        flops = step_flops(model_cfg, batch["doc_lengths"], int(batch["loss_mask"].sum()), audio_chunks)
        step_s = float(np.median(times))
        return {
            "step_s": step_s,
            "tokens_per_s": seq_length / step_s,
            "model_tflops": flops / step_s / 1e12,
            "peak_memory_gb": sft._memory_gb(),
            "backend": model.backend,
            "fp8": fp8 if fp8 and not cpu else "off",
        }
    finally:
        destroy_distributed()
