"""Which tensor/context/pipeline parallel sizes a model allows (no Megatron import, so every CLI can check).

Used by the model builder, the converter and SFT's startup checks: one rule set, one-line refusals
naming the setting, its value and the allowed values.
"""

from __future__ import annotations

from megatron_ext.config import ConfigError, ModelConfig


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_parallelism(cfg: ModelConfig, tp: int, cp: int = 1, pp: int = 1, with_audio: bool = True) -> None:
    """Refuse layouts the model cannot run: TP must split whole encoder heads and KV groups, CP is 1 with
    audio (Whisper never attends across 30 s chunks, so there is nothing to ring), PP divides the layers."""
    for name, size in (("tensor", tp), ("context", cp), ("pipeline", pp)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"{name}_model_parallel_size={size!r}: must be an integer >= 1")
    if with_audio and cfg.encoder is not None:
        heads = cfg.encoder.num_attention_heads
        if heads % tp:
            raise ConfigError(
                f"tensor_model_parallel_size={tp}: the audio encoder's {heads} attention heads need TP in "
                f"{divisors(heads)}"
            )
        if cp != 1:
            raise ConfigError(f"context_parallel_size={cp}: must be 1 while the audio encoder is active (allowed: 1)")
    dec = cfg.decoder
    if dec.num_query_groups % tp:
        raise ConfigError(
            f"tensor_model_parallel_size={tp}: the decoder's {dec.num_query_groups} KV groups need TP in "
            f"{divisors(dec.num_query_groups)}"
        )
    for name, size in (("vocab_size", dec.vocab_size), ("ffn_hidden_size", dec.ffn_hidden_size)):
        if size % tp:
            raise ConfigError(f"tensor_model_parallel_size={tp}: decoder.{name}={size} is not divisible by it")
    if dec.num_layers % pp:
        raise ConfigError(
            f"pipeline_model_parallel_size={pp}: the decoder's {dec.num_layers} layers need PP in "
            f"{divisors(dec.num_layers)}"
        )
