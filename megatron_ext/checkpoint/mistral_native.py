"""Mistral-native layout (`consolidated.safetensors` + `params.json`) <-> HF layout: names, rope rows, config.

Native q/k weights keep rope pairs interleaved (rows 2i, 2i+1 of a head rotate together); HF and
Megatron (rotary_interleaved=False) use rotate-half, so q/k rows are permuted on the way through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from megatron_ext.config import ConfigError, DecoderConfig, EncoderConfig, ModelConfig, RopeConfig


def hf_decoder_prefix(arch: str) -> tuple[str, str]:
    """(prefix of decoder layers/norm/embeddings, name of the LM head) in an HF checkpoint of `arch`."""
    if arch == "voxtral":
        return "language_model.model.", "language_model.lm_head.weight"
    return "model.", "lm_head.weight"


@dataclass(frozen=True)
class NameRule:
    """One native <-> HF name pair; `{i}` is a layer index and `{p}` a parameter kind (weight|bias)."""

    native: str
    hf: str

    @staticmethod
    def _regex(template: str) -> re.Pattern[str]:
        pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        return re.compile(f"^{pattern}$")

    def convert(self, name: str, to_hf: bool) -> str | None:
        src, dst = (self.native, self.hf) if to_hf else (self.hf, self.native)
        m = self._regex(src).match(name)
        return dst.format(**m.groupdict()) if m else None


def _rules(arch: str) -> list[NameRule]:
    pre, head = hf_decoder_prefix(arch)
    layer = f"{pre}layers.{{i}}."
    rules = [
        NameRule("output.weight", head),
        NameRule("norm.weight", f"{pre}norm.weight"),
        NameRule("layers.{i}.attention_norm.weight", layer + "input_layernorm.weight"),
        NameRule("layers.{i}.ffn_norm.weight", layer + "post_attention_layernorm.weight"),
        NameRule("layers.{i}.feed_forward.w1.weight", layer + "mlp.gate_proj.weight"),
        NameRule("layers.{i}.feed_forward.w2.weight", layer + "mlp.down_proj.weight"),
        NameRule("layers.{i}.feed_forward.w3.weight", layer + "mlp.up_proj.weight"),
    ]
    rules += [NameRule(f"layers.{{i}}.attention.w{x}.weight", layer + f"self_attn.{x}_proj.weight") for x in "qkvo"]
    if arch != "voxtral":
        return rules + [NameRule("tok_embeddings.weight", f"{pre}embed_tokens.weight")]
    enc = "mm_whisper_embeddings.whisper_encoder."
    enc_layer = enc + "transformer.layers.{i}."
    hf_layer = "audio_tower.layers.{i}."
    return rules + [
        # Voxtral stores its token embedding under the multimodal prefix ("Voxtral-compatible key").
        NameRule("mm_whisper_embeddings.tok_embeddings.weight", f"{pre}embed_tokens.weight"),
        NameRule(enc + "conv_layers.0.{p}", "audio_tower.conv1.{p}"),
        NameRule(enc + "conv_layers.1.{p}", "audio_tower.conv2.{p}"),
        NameRule(enc + "transformer.norm.{p}", "audio_tower.layer_norm.{p}"),
        NameRule(enc_layer + "attention.wq.{p}", hf_layer + "self_attn.q_proj.{p}"),
        NameRule(enc_layer + "attention.wk.{p}", hf_layer + "self_attn.k_proj.{p}"),
        NameRule(enc_layer + "attention.wv.{p}", hf_layer + "self_attn.v_proj.{p}"),
        NameRule(enc_layer + "attention.wo.{p}", hf_layer + "self_attn.out_proj.{p}"),
        NameRule(enc_layer + "attention_norm.{p}", hf_layer + "self_attn_layer_norm.{p}"),
        NameRule(enc_layer + "feed_forward.w1.{p}", hf_layer + "fc1.{p}"),
        NameRule(enc_layer + "feed_forward.w2.{p}", hf_layer + "fc2.{p}"),
        NameRule(enc_layer + "ffn_norm.{p}", hf_layer + "final_layer_norm.{p}"),
        NameRule("mm_whisper_embeddings.audio_language_projection.0.weight", "multi_modal_projector.linear_1.weight"),
        NameRule("mm_whisper_embeddings.audio_language_projection.2.weight", "multi_modal_projector.linear_2.weight"),
    ]


def convert_name(name: str, arch: str, to_hf: bool) -> str:
    """Map one tensor name between the native and HF layouts of `arch`; unknown names raise KeyError."""
    for rule in _rules(arch):
        out = rule.convert(name, to_hf)
        if out is not None:
            return out
    raise KeyError(f"tensor {name!r} has no {'HF' if to_hf else 'Mistral-native'} counterpart for {arch}")


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Native q/k rows (pairs interleaved per head) -> HF/Megatron rotate-half row order."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_heads(hf_name: str, cfg: ModelConfig) -> int | None:
    """Heads to permute for a decoder q/k weight (encoder attention has no rope), else None."""
    if hf_name.startswith("audio_tower."):
        return None
    if hf_name.endswith("self_attn.q_proj.weight"):
        return cfg.decoder.num_attention_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return cfg.decoder.num_query_groups
    return None


# ---- params.json <-> ModelConfig ------------------------------------------------------------------


# Whisper large-v3's token vocabulary: Voxtral's params.json declares it for the encoder, which has no token
# embedding (vLLM's adapter requires the key).
WHISPER_VOCAB_SIZE = 51866
AUDIO_ENCODING_KEYS = ("num_mel_bins", "window_size", "sampling_rate", "hop_length")


def audio_encoding_args(audio: dict[str, Any] | None) -> dict[str, Any]:
    """`encoder_args.audio_encoding_args` from a tekken.json `audio` section (Voxtral's tokenizer holds the
    front-end settings: sampling_rate and audio_encoding_config{num_mel_bins, hop_length, window_size})."""
    if not audio:
        raise ConfigError("no audio encoding settings: the checkpoint's tekken.json has no 'audio' section")
    values = {"sampling_rate": audio.get("sampling_rate"), **(audio.get("audio_encoding_config") or {})}
    if missing := [k for k in AUDIO_ENCODING_KEYS if values.get(k) is None]:
        raise ConfigError(f"tekken.json 'audio' section lacks {', '.join(missing)}")
    return {k: values[k] for k in AUDIO_ENCODING_KEYS}


def params_from_config(cfg: ModelConfig, audio: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mistral-native `params.json` for `cfg` (YaRN and llama-4 scaling in Mistral's own spelling); `audio` is
    the tekken.json `audio` section, required for a model with an audio encoder."""
    d, rope = cfg.decoder, cfg.decoder.rope
    params: dict[str, Any] = {
        "dim": d.hidden_size,
        "n_layers": d.num_layers,
        "head_dim": d.kv_channels,
        "hidden_dim": d.ffn_hidden_size,
        "n_heads": d.num_attention_heads,
        "n_kv_heads": d.num_query_groups,
        "rope_theta": rope.theta,
        "norm_eps": d.norm_eps,
        "vocab_size": d.vocab_size,
        "max_seq_len": d.max_position_embeddings,
        "max_position_embeddings": d.max_position_embeddings,
    }
    if rope.type == "yarn":
        if rope.mscale != 1.0 or rope.mscale_all_dim not in (0.0, 1.0) or not rope.truncate:
            raise ConfigError("params.json YaRN expresses only mscale 1 with mscale_all_dim 0 or 1, truncate=True")
        params["yarn"] = {
            "factor": rope.factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
            "beta": rope.beta_fast,
            "alpha": rope.beta_slow,
            "apply_scale": rope.mscale_all_dim == 0.0,
        }
    if rope.llama4_scaling_beta is not None:
        params["llama_4_scaling"] = {
            "original_max_position_embeddings": rope.original_max_position_embeddings,
            "beta": rope.llama4_scaling_beta,
        }
    if cfg.encoder is not None:
        e = cfg.encoder
        params["multimodal"] = {
            "whisper_model_args": {
                "encoder_args": {
                    "dim": e.hidden_size,
                    "n_layers": e.num_layers,
                    "hidden_dim": e.ffn_hidden_size,
                    "n_heads": e.num_attention_heads,
                    "head_dim": e.hidden_size // e.num_attention_heads,
                    "vocab_size": WHISPER_VOCAB_SIZE,
                    "max_source_positions": e.max_source_positions,
                    "audio_encoding_args": audio_encoding_args(audio),
                },
                "downsample_args": {"downsample_factor": cfg.projector_stack},
            },
            "audio_token_id": cfg.audio_token_id,
        }
    return params


def config_from_params(params: dict[str, Any], arch: str) -> ModelConfig:
    """Read a Mistral-native `params.json` dict (inverse of `params_from_config`)."""
    try:
        yarn, l4 = params.get("yarn"), params.get("llama_4_scaling")
        rope = RopeConfig(theta=float(params["rope_theta"]))
        if l4 and not yarn:
            raise ConfigError("params.json: llama_4_scaling is set but the yarn block is missing")
        if yarn:
            original = yarn["original_max_position_embeddings"]
            if l4 and l4["original_max_position_embeddings"] != original:
                raise ConfigError(
                    "params.json: llama_4_scaling.original_max_position_embeddings "
                    f"{l4['original_max_position_embeddings']} differs from yarn's {original}"
                )
            rope = RopeConfig(
                theta=float(params["rope_theta"]),
                type="yarn",
                factor=float(yarn["factor"]),
                original_max_position_embeddings=original,
                beta_fast=float(yarn["beta"]),
                beta_slow=float(yarn["alpha"]),
                # As transformers and vLLM read it: apply_scale false keeps the attention factor at 1.
                mscale=1.0,
                mscale_all_dim=0.0 if yarn.get("apply_scale", False) else 1.0,
                llama4_scaling_beta=float(l4["beta"]) if l4 else None,
            )
        decoder = DecoderConfig(
            num_layers=params["n_layers"],
            hidden_size=params["dim"],
            ffn_hidden_size=params["hidden_dim"],
            num_attention_heads=params["n_heads"],
            num_query_groups=params["n_kv_heads"],
            kv_channels=params.get("head_dim") or params["dim"] // params["n_heads"],
            vocab_size=params["vocab_size"],
            norm_eps=params["norm_eps"],
            max_position_embeddings=params.get("max_position_embeddings") or params.get("max_seq_len", 131072),
            rope=rope,
        )
        mm = params.get("multimodal")
        if not mm:
            return ModelConfig(decoder=decoder, hf_architecture=arch)  # type: ignore[arg-type]
        ea = mm["whisper_model_args"]["encoder_args"]
        encoder = EncoderConfig(
            num_layers=ea["n_layers"],
            hidden_size=ea["dim"],
            ffn_hidden_size=ea["hidden_dim"],
            num_attention_heads=ea["n_heads"],
            max_source_positions=ea.get("max_source_positions", 1500),
            num_mel_bins=ea.get("audio_encoding_args", {}).get("num_mel_bins", 128),
        )
        stack = mm["whisper_model_args"].get("downsample_args", {}).get("downsample_factor", 4)
        return ModelConfig(decoder, encoder, mm.get("audio_token_id", 24), stack, "voxtral")
    except KeyError as exc:
        raise ConfigError(f"params.json: missing field {exc}") from None
