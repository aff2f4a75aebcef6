"""Architecture description shared by every tool: decoder, rope/YaRN, Whisper encoder, projector.

One `ModelConfig` travels with every checkpoint we write (see `checkpoint/`), so rope and YaRN settings
can never silently drop out of a merge or a conversion (the paper lost SWE-Bench points that way).
It converts to and from the HF `config.json` of the three parent layouts (Voxtral, Mistral, Ministral3).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_ext.errors import ProjectError

HFArchitecture = Literal["voxtral", "mistral", "ministral3"]

HF_CLASS_NAMES: dict[str, str] = {
    "voxtral": "VoxtralForConditionalGeneration",
    "mistral": "MistralForCausalLM",
    "ministral3": "Ministral3ForCausalLM",
}


# model_type values `ModelConfig.from_hf` reads (mistral3: the text model of Mistral3ForConditionalGeneration).
HF_MODEL_TYPES = ("voxtral", "mistral", "ministral3", "mistral3")
VISION_ONLY_TYPES = ("pixtral", "pixtral_vision")


# Whisper large-v3 (Voxtral's audio tower): its width, and its positions per 30 s chunk.
WHISPER_LARGE_WIDTH = 1280
WHISPER_POSITIONS = 1500


class ConfigError(ProjectError, ValueError):
    """A model configuration is missing a field or holds an invalid value."""


def _check_int(value: object, name: str, minimum: int = 1) -> None:
    """`value` is an int (not a bool or a numeric string) >= minimum, else a ConfigError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r}: expected an integer >= {minimum}")


def _check_float(value: object, name: str, minimum: float | None = None, strict: bool = False) -> None:
    """`value` is a finite number (> minimum if strict, else >= minimum), else a ConfigError naming the field."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ConfigError(f"{name}={value!r}: expected a finite number{bound}")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings; `type="yarn"` needs every YaRN field explicit (no library defaults)."""

    theta: float = 1e8
    type: Literal["rope", "yarn"] = "rope"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    # HF `truncate` == Megatron `correction_range_round_to_int`: round the YaRN correction range to ints.
    truncate: bool = True
    # Devstral-2 "llama-4" query scaling: q *= 1 + beta * ln(1 + floor(pos / original_max_position)).
    llama4_scaling_beta: float | None = None

    YARN_FIELDS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")

    def __post_init__(self) -> None:
        if self.type not in ("rope", "yarn"):
            raise ConfigError(f"rope.type={self.type!r}: expected 'rope' or 'yarn'")
        _check_float(self.theta, "rope.theta", 0.0, strict=True)
        for name, minimum, strict in (
            ("factor", 0.0, True),
            ("beta_fast", None, False),
            ("beta_slow", None, False),
            ("mscale", 0.0, False),
            ("mscale_all_dim", 0.0, False),
            ("llama4_scaling_beta", 0.0, False),
        ):
            if getattr(self, name) is not None:
                _check_float(getattr(self, name), f"rope.{name}", minimum, strict)
        if self.original_max_position_embeddings is not None:
            _check_int(self.original_max_position_embeddings, "rope.original_max_position_embeddings")
        if not isinstance(self.truncate, bool):
            raise ConfigError(f"rope.truncate={self.truncate!r}: expected true or false")
        if self.type == "yarn":
            missing = [f for f in self.YARN_FIELDS if getattr(self, f) is None]
            if missing:
                raise ConfigError(f"rope.type='yarn' but these YaRN settings are missing: {', '.join(missing)}")
        if self.llama4_scaling_beta is not None and self.original_max_position_embeddings is None:
            raise ConfigError("rope.llama4_scaling_beta needs rope.original_max_position_embeddings")

    def yarn_attention_factor(self) -> float:
        """Multiplier applied to cos/sin: get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)."""
        if self.type != "yarn":
            return 1.0

        def get_mscale(scale: float, m: float) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        return get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)


@dataclass(frozen=True)
class DecoderConfig:
    """Mistral Small 3 style decoder: GQA, SwiGLU, RMSNorm, no biases, untied LM head."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    rope: RopeConfig = field(default_factory=RopeConfig)

    def __post_init__(self) -> None:
        ints = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
        for name in (*ints, "kv_channels", "vocab_size", "max_position_embeddings"):
            _check_int(getattr(self, name), f"decoder.{name}")
        _check_float(self.norm_eps, "decoder.norm_eps", 0.0, strict=True)
        if not isinstance(self.rope, RopeConfig):
            raise ConfigError(f"decoder.rope={self.rope!r}: expected a rope section")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"decoder.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"decoder.num_query_groups={self.num_query_groups}"
            )


def mistral_small_decoder(num_layers: int = 40, rope: RopeConfig | None = None) -> DecoderConfig:
    """Mistral Small 3 (24B) decoder shapes, shared by both parents; fewer layers for benchmarks."""
    return DecoderConfig(
        num_layers=num_layers,
        hidden_size=5120,
        ffn_hidden_size=32768,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=128,
        vocab_size=131072,
        rope=rope or RopeConfig(theta=1e8),
    )


@dataclass(frozen=True)
class EncoderConfig:
    """Whisper encoder (Voxtral's audio tower): conv front-end, pre-LN MHA layers, final LayerNorm."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_mel_bins: int = 128
    max_source_positions: int = 1500
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_mel_bins"):
            _check_int(getattr(self, name), f"encoder.{name}")
        _check_int(self.max_source_positions, "encoder.max_source_positions")
        _check_float(self.norm_eps, "encoder.norm_eps", 0.0, strict=True)
        if self.hidden_size == WHISPER_LARGE_WIDTH and self.max_source_positions != WHISPER_POSITIONS:
            raise ConfigError(
                f"encoder.max_source_positions={self.max_source_positions}: an encoder of Whisper's width "
                f"({WHISPER_LARGE_WIDTH}) keeps Whisper's {WHISPER_POSITIONS} positions (30 s chunks); shorter "
                "chunks are for small encoders only"
            )

    @property
    def mel_frames(self) -> int:
        """Mel frames per chunk: conv2 has stride 2, so 2 x max_source_positions (3000 = 30 s). The chunk
        length is this field: a small encoder may take shorter chunks (the miniature's 400 frames = 4 s)."""
        return 2 * self.max_source_positions


@dataclass(frozen=True)
class ModelConfig:
    """A whole checkpoint's architecture: decoder, optional audio stack, and which HF layout it came from."""

    decoder: DecoderConfig
    encoder: EncoderConfig | None = None
    audio_token_id: int | None = None
    # Frames stacked by the projector: encoder output [chunks, 1500, d] -> [-1, d * stack] (4 in Voxtral).
    projector_stack: int = 4
    hf_architecture: HFArchitecture = "mistral"

    def __post_init__(self) -> None:
        if self.hf_architecture not in HF_CLASS_NAMES:
            raise ConfigError(f"hf_architecture={self.hf_architecture!r}: expected one of {', '.join(HF_CLASS_NAMES)}")
        if not isinstance(self.decoder, DecoderConfig):
            raise ConfigError(f"decoder={self.decoder!r}: expected a decoder section")
        if self.encoder is not None and not isinstance(self.encoder, EncoderConfig):
            raise ConfigError(f"encoder={self.encoder!r}: expected an encoder section")
        _check_int(self.projector_stack, "projector_stack")
        if self.encoder is not None and self.audio_token_id is None:
            raise ConfigError("model has an audio encoder but no audio_token_id")
        if self.audio_token_id is not None:
            _check_int(self.audio_token_id, "audio_token_id", 0)
            if self.audio_token_id >= self.decoder.vocab_size:
                raise ConfigError(
                    f"audio_token_id={self.audio_token_id} is outside the vocabulary (size {self.decoder.vocab_size})"
                )

    @property
    def has_audio(self) -> bool:
        return self.encoder is not None

    @property
    def projector_input_size(self) -> int:
        assert self.encoder is not None
        return self.encoder.hidden_size * self.projector_stack

    # ---- serialisation (stored as checkpoint metadata) ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        try:
            dec = dict(data["decoder"])
            if "rope" not in dec:
                raise ConfigError(
                    "model config has no decoder.rope: rope/YaRN settings are required; re-convert the "
                    "checkpoint or pass them explicitly (e.g. --rope-from or a rope section in the config)"
                )
            dec["rope"] = RopeConfig(**dec["rope"])
            enc = data.get("encoder")
            return cls(
                decoder=DecoderConfig(**dec),
                encoder=EncoderConfig(**enc) if enc else None,
                audio_token_id=data.get("audio_token_id"),
                projector_stack=data.get("projector_stack", 4),
                hf_architecture=data.get("hf_architecture", "mistral"),
            )
        except TypeError as exc:  # unknown or missing dataclass field
            raise ConfigError(f"invalid model config: {exc}") from None

    # ---- HF config.json ----
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read an HF `config.json` dict of a Voxtral, Mistral, Ministral3 or Mistral3 (text part) checkpoint."""
        model_type = hf.get("model_type")
        if model_type == "voxtral":
            text, audio = hf["text_config"], hf["audio_config"]
            encoder = EncoderConfig(
                num_layers=audio["num_hidden_layers"],
                hidden_size=audio["hidden_size"],
                ffn_hidden_size=audio["intermediate_size"],
                num_attention_heads=audio["num_attention_heads"],
                num_mel_bins=audio.get("num_mel_bins", 128),
                max_source_positions=audio.get("max_source_positions", 1500),
            )
            return cls(
                decoder=_decoder_from_hf(text),
                encoder=encoder,
                audio_token_id=hf["audio_token_id"],
                projector_stack=audio["intermediate_size"] // audio["hidden_size"],
                hf_architecture="voxtral",
            )
        if model_type in ("mistral", "ministral3"):
            return cls(decoder=_decoder_from_hf(hf), hf_architecture=model_type)
        if model_type == "mistral3":  # Mistral3ForConditionalGeneration: read its text model; vision is dropped
            text = hf.get("text_config")
            if not isinstance(text, dict) or text.get("model_type", "mistral") not in ("mistral", "ministral3"):
                raise ConfigError("config.json: mistral3 text_config.model_type must be mistral or ministral3")
            return cls(decoder=_decoder_from_hf(text), hf_architecture=text.get("model_type", "mistral"))
        if model_type in VISION_ONLY_TYPES:
            raise ConfigError(f"config.json: model_type={model_type!r} is a vision-only model (no language model)")
        known = ", ".join(HF_MODEL_TYPES)
        raise ConfigError(f"config.json: unsupported model_type={model_type!r} (known: {known})")

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict for this model in its own layout (`hf_architecture`)."""
        text = _decoder_to_hf(self.decoder, self.hf_architecture)
        if self.hf_architecture != "voxtral":
            return {"architectures": [HF_CLASS_NAMES[self.hf_architecture]], **text}
        enc = self.encoder
        if enc is None:
            raise ConfigError("hf_architecture='voxtral' needs an audio encoder")
        audio = {
            "model_type": "voxtral_encoder",
            "num_hidden_layers": enc.num_layers,
            "hidden_size": enc.hidden_size,
            "intermediate_size": enc.hidden_size * self.projector_stack,
            "num_attention_heads": enc.num_attention_heads,
            "num_mel_bins": enc.num_mel_bins,
            "max_source_positions": enc.max_source_positions,
            "activation_function": "gelu",
            "scale_embedding": False,
        }
        if enc.ffn_hidden_size != enc.hidden_size * self.projector_stack:
            raise ConfigError("HF Voxtral ties encoder ffn size to projector input (intermediate_size)")
        return {
            "architectures": [HF_CLASS_NAMES["voxtral"]],
            "model_type": "voxtral",
            "audio_config": audio,
            "text_config": text,
            "audio_token_id": self.audio_token_id,
            "projector_hidden_act": "gelu",
            "hidden_size": self.decoder.hidden_size,
        }


def _decoder_from_hf(text: dict[str, Any]) -> DecoderConfig:
    heads = text["num_attention_heads"]
    rp = dict(text.get("rope_parameters") or {})
    if not rp and "rope_theta" in text:  # transformers 4.x layout
        rp = {"rope_theta": text["rope_theta"], **(text.get("rope_scaling") or {})}
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if "rope_theta" not in rp:
        raise ConfigError("config.json: no rope_theta in rope_parameters")
    if rope_type == "yarn":
        rope = RopeConfig(
            theta=float(rp["rope_theta"]),
            type="yarn",
            factor=rp.get("factor"),
            original_max_position_embeddings=rp.get("original_max_position_embeddings"),
            beta_fast=rp.get("beta_fast", 32.0),
            beta_slow=rp.get("beta_slow", 1.0),
            mscale=rp.get("mscale", 1.0),
            mscale_all_dim=rp.get("mscale_all_dim", 0.0),
            truncate=rp.get("truncate", True),
            llama4_scaling_beta=rp.get("llama_4_scaling_beta"),
        )
    elif rope_type == "default":
        rope = RopeConfig(theta=float(rp["rope_theta"]))
    else:
        raise ConfigError(f"config.json: unsupported rope_type={rope_type!r} (default, yarn)")
    return DecoderConfig(
        num_layers=text["num_hidden_layers"],
        hidden_size=text["hidden_size"],
        ffn_hidden_size=text["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=text.get("num_key_value_heads", heads),
        kv_channels=text.get("head_dim") or text["hidden_size"] // heads,
        vocab_size=text["vocab_size"],
        norm_eps=text.get("rms_norm_eps", 1e-5),
        max_position_embeddings=text.get("max_position_embeddings", 131072),
        rope=rope,
    )


def _decoder_to_hf(dec: DecoderConfig, arch: HFArchitecture) -> dict[str, Any]:
    rope = dec.rope
    rp: dict[str, Any] = {"rope_theta": rope.theta, "rope_type": "default"}
    if rope.type == "yarn":
        rp.update(
            rope_type="yarn",
            factor=rope.factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
            beta_fast=rope.beta_fast,
            beta_slow=rope.beta_slow,
            mscale=rope.mscale,
            mscale_all_dim=rope.mscale_all_dim,
            truncate=rope.truncate,
        )
    if rope.llama4_scaling_beta is not None:
        if arch != "ministral3":
            raise ConfigError(f"llama-4 query scaling is only expressible in the ministral3 HF layout, not {arch}")
        rp["llama_4_scaling_beta"] = rope.llama4_scaling_beta
        rp.setdefault("original_max_position_embeddings", rope.original_max_position_embeddings)
    out: dict[str, Any] = {
        "model_type": {"voxtral": "llama", "mistral": "mistral", "ministral3": "ministral3"}[arch],
        "vocab_size": dec.vocab_size,
        "hidden_size": dec.hidden_size,
        "intermediate_size": dec.ffn_hidden_size,
        "num_hidden_layers": dec.num_layers,
        "num_attention_heads": dec.num_attention_heads,
        "num_key_value_heads": dec.num_query_groups,
        "head_dim": dec.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": dec.max_position_embeddings,
        "rms_norm_eps": dec.norm_eps,
        "tie_word_embeddings": False,
        "rope_parameters": rp,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if arch != "voxtral":
        out["sliding_window"] = None
    return out
