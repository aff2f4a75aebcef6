"""GPU throughput check: full-width Mistral-Small decoder layers on the Transformer Engine spec, BF16 and FP8.

Runs forward + backward of a few decoder layers (hidden 5120, 32 query / 8 KV heads of 128, SwiGLU ffn
32768, rope theta 1e8) on one GPU at TP=1 and prints model TFLOP/s and peak memory. FLOPs follow the
causal-attention convention (only the lower triangle of QK^T and PV is counted) and 3x the forward
for training (forward + two backward GEMMs), the same count as FACTS.md's ~266 GFLOP/token.
CUDA and Transformer Engine are needed to run; the FLOP model and argument checks work anywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from megatron_ext.config import ConfigError, DecoderConfig, ModelConfig


@dataclass(frozen=True)
class LayerShape:
    """The decoder-layer geometry the check runs (defaults: Mistral Small 3 / Devstral / Voxtral decoder)."""

    layers: int = 4
    hidden: int = 5120
    heads: int = 32
    kv_groups: int = 8
    head_dim: int = 128
    ffn: int = 32768
    seq: int = 8192
    micro_batch: int = 1

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "kv_groups", "head_dim", "ffn", "seq", "micro_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= 1")
        if self.heads % self.kv_groups:
            raise ConfigError(f"--heads={self.heads} is not a multiple of --kv-groups={self.kv_groups}")


def layer_flops_per_token(shape: LayerShape, causal: bool = True) -> dict[str, float]:
    """Forward FLOPs per token of one decoder layer, by part (2 FLOPs per multiply-add)."""
    q, kv, h = shape.heads * shape.head_dim, shape.kv_groups * shape.head_dim, shape.hidden
    attention = 4 * shape.seq * q * (0.5 if causal else 1.0)  # QK^T and PV over the keys each query sees
    return {"qkv": 2 * h * (q + 2 * kv), "attention": attention, "proj": 2 * q * h, "mlp": 6 * h * shape.ffn}


def training_flops_per_token(shape: LayerShape, vocab: int | None = None, causal: bool = True) -> float:
    """Forward + backward FLOPs per token for `shape.layers` layers (+ the LM head when `vocab` is given)."""
    forward = shape.layers * sum(layer_flops_per_token(shape, causal).values())
    if vocab is not None:
        forward += 2 * shape.hidden * vocab
    return 3 * forward


@dataclass
class CheckResult:
    precision: str
    tflops: float
    step_seconds: float
    peak_memory_gib: float
    tokens_per_second: float

    def line(self) -> str:
        return (
            f"{self.precision}: {self.tflops:.1f} model TFLOP/s (causal), {self.tokens_per_second:,.0f} tokens/s, "
            f"{self.step_seconds * 1e3:.1f} ms/step, peak memory {self.peak_memory_gib:.2f} GiB"
        )


def _model_config(shape: LayerShape) -> ModelConfig:
    return ModelConfig(
        DecoderConfig(
            num_layers=shape.layers,
            hidden_size=shape.hidden,
            ffn_hidden_size=shape.ffn,
            num_attention_heads=shape.heads,
            num_query_groups=shape.kv_groups,
            kv_channels=shape.head_dim,
            vocab_size=131072,
            max_position_embeddings=max(131072, shape.seq),
        )
    )


def require_gpu() -> None:
    """One-line refusal unless CUDA and Transformer Engine are both usable."""
    import torch

    from megatron_ext.models.specs import te_available

    if not torch.cuda.is_available():
        raise ConfigError("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False on this machine)")
    if not te_available():
        raise ConfigError("gpu_check needs Transformer Engine: pip install -r requirements-gpu.txt")


def build_layers(shape: LayerShape, precision: str, backend: str = "te", fp8_recipe: str = "delayed"):
    """`shape.layers` decoder layers as a DecoderModel without embedding or LM head (hidden states in and out)."""
    from megatron_ext.models.build import BuildConfig, FP8Config, decoder_transformer_config
    from megatron_ext.models.decoder import DecoderModel
    from megatron_ext.models.specs import decoder_layer_spec

    if precision not in ("bf16", "fp8", "fp32"):
        raise ConfigError(f"precision={precision!r}: allowed bf16, fp8 (fp32 for CPU smoke tests)")
    cfg = _model_config(shape)
    fp8 = FP8Config(format="hybrid", recipe=fp8_recipe) if precision == "fp8" else None
    dtype = "float32" if precision == "fp32" else "bfloat16"
    build = BuildConfig(backend=backend, params_dtype=dtype, fp8=fp8)
    tc = decoder_transformer_config(cfg, build, tp=1, pp=1, cp=1, backend=backend)
    return DecoderModel(
        tc,
        decoder_layer_spec(backend),
        vocab_size=cfg.decoder.vocab_size,
        max_sequence_length=shape.seq,
        pre_process=False,
        post_process=False,
        position_embedding_type="rope",
        rotary_base=cfg.decoder.rope.theta,
    )


def time_steps(model, x, steps: int, warmup: int) -> float:
    """Mean seconds of one forward + backward of `model` on hidden states `x` [seq, batch, hidden]."""
    import torch

    def step() -> None:
        model.set_input_tensor(x)
        out = model(None, None, None)
        out.backward(torch.ones_like(out))

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def run_check(
    shape: LayerShape, precision: str, steps: int = 10, warmup: int = 3, fp8_recipe: str = "delayed"
) -> CheckResult:
    """Time `steps` forward+backward passes of the layers on the TE spec in BF16 or FP8 (TP=1, one GPU)."""
    import torch
    from megatron.core import parallel_state

    from megatron_ext.compat.cpu import init_distributed

    require_gpu()
    if precision not in ("bf16", "fp8"):
        raise ConfigError(f"precision={precision!r}: allowed bf16, fp8")
    if not parallel_state.model_parallel_is_initialized():
        init_distributed(tp=1, pp=1)
    model = build_layers(shape, precision, "te", fp8_recipe).cuda()
    x = torch.randn(shape.seq, shape.micro_batch, shape.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(model, x, steps, warmup)
    tokens = shape.seq * shape.micro_batch
    flops = training_flops_per_token(shape) * tokens
    return CheckResult(
        precision, flops / seconds / 1e12, seconds, torch.cuda.max_memory_allocated() / 2**30, tokens / seconds
    )
