"""Which tensor/context/pipeline parallel sizes a model allows (no Megatron import, so every CLI can check).

Used by the model builder, the converter and SFT's startup checks: one rule set, one-line refusals
naming the setting, its value and the allowed values.
"""

from __future__ import annotations

from megatron_ext.config import ConfigError, ModelConfig


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


ENCODER_PARALLEL = ("split", "replicate")


class EncoderHeadsError(ConfigError):
    """TP does not divide the audio encoder's heads while they are split over TP (replication would lift it)."""


def validate_parallelism(
    cfg: ModelConfig,
    tp: int,
    cp: int = 1,
    pp: int = 1,
    with_audio: bool = True,
    backend: str | None = None,
    encoder_parallel: str = "split",
) -> None:
    """Refuse layouts the model cannot run: TP must split whole KV groups, and whole encoder heads unless the
    (frozen) encoder is replicated on every TP rank (`encoder_parallel="replicate"`); CP > 1 needs Transformer
    Engine's attention (`backend` "te"; None: not known yet, checked again at build time); PP divides the layers.
    With audio, CP is chunk parallelism (`models/cp_audio.py`): Whisper never attends across 30 s chunks."""
    for name, size in (("tensor", tp), ("context", cp), ("pipeline", pp)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"{name}_model_parallel_size={size!r}: must be an integer >= 1")
    if encoder_parallel not in ENCODER_PARALLEL:
        raise ConfigError(f"encoder_parallel={encoder_parallel!r}: allowed {', '.join(ENCODER_PARALLEL)}")
    if with_audio and cfg.encoder is not None and encoder_parallel == "split":
        heads = cfg.encoder.num_attention_heads
        if heads % tp:
            raise EncoderHeadsError(
                f"tensor_model_parallel_size={tp}: the audio encoder's {heads} attention heads need TP in "
                f"{divisors(heads)}"
            )
    if cp != 1 and backend == "local":
        raise ConfigError(
            f"context_parallel_size={cp}: Megatron-Core's local attention has no context parallelism; it needs "
            "Transformer Engine (a GPU with TE, model.transformer_impl auto or transformer_engine) (allowed here: 1)"
        )
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
