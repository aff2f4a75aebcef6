"""Which weights LoRA adapts and the adapter tensors' names and shapes (no torch: the config schema reads it).

Targets name Megatron-Core linears: the decoder's `linear_qkv`, `linear_proj`, `linear_fc1` (SwiGLU, [gate; up]),
`linear_fc2` in every layer, and `projector` (both linears of the audio projector). An adapter of weight
`X.weight` [out, in] is `X.lora_a` [rank, in] and `X.lora_b` [out, rank].
"""

from __future__ import annotations

from megatron_ext.config import ModelConfig

DECODER_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
TARGETS = (*DECODER_TARGETS, "projector")
DEFAULT_TARGETS = ("linear_qkv", "linear_proj", "projector")
_DECODER_MODULE = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp"}


def _decoder_in_out(cfg: ModelConfig, target: str) -> tuple[int, int]:
    d = cfg.decoder
    q, kv = d.num_attention_heads * d.kv_channels, d.num_query_groups * d.kv_channels
    return {
        "linear_qkv": (d.hidden_size, q + 2 * kv),
        "linear_proj": (q, d.hidden_size),
        "linear_fc1": (d.hidden_size, 2 * d.ffn_hidden_size),  # SwiGLU: [gate; up]
        "linear_fc2": (d.ffn_hidden_size, d.hidden_size),
    }[target]


def adapted_weights(cfg: ModelConfig, targets: list[str] | tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Megatron name of every weight the targets adapt -> its (in_features, out_features)."""
    out: dict[str, tuple[int, int]] = {}
    for i in range(cfg.decoder.num_layers):
        for t in DECODER_TARGETS:
            if t in targets:
                out[f"language_model.decoder.layers.{i}.{_DECODER_MODULE.get(t, 'mlp')}.{t}.weight"] = _decoder_in_out(
                    cfg, t
                )
    if "projector" in targets and cfg.encoder is not None:
        h = cfg.decoder.hidden_size
        out["audio_projector.encoder.linear_fc1.weight"] = (cfg.encoder.hidden_size * cfg.projector_stack, h)
        out["audio_projector.encoder.linear_fc2.weight"] = (h, h)
    return out


def adapter_shapes(cfg: ModelConfig, rank: int, targets: list[str] | tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Every adapter tensor's name and full shape: A [rank, in], B [out, rank] per adapted weight."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, (fan_in, fan_out) in adapted_weights(cfg, targets).items():
        stem = name.removesuffix("weight")
        shapes[stem + "lora_a"], shapes[stem + "lora_b"] = (rank, fan_in), (fan_out, rank)
    return shapes


def trainable_count(cfg: ModelConfig, rank: int, targets: list[str] | tuple[str, ...]) -> int:
    """Adapter parameters of a model of `cfg` (what a LoRA run trains)."""
    return sum(a * b for a, b in adapter_shapes(cfg, rank, targets).values())
