"""Construction-time refusals: one line naming the setting, its value and the allowed values."""

from __future__ import annotations

import pytest

from megatron_ext.config import ConfigError, DecoderConfig, EncoderConfig, ModelConfig, RopeConfig
from megatron_ext.models.build import FP8Config
from megatron_ext.models.specs import resolve_backend, te_available
from megatron_ext.parallel_layout import validate_parallelism

# Voxtral Small's real shape (no weights needed): 20 encoder heads, 8 decoder KV groups.
VOXTRAL_SMALL = ModelConfig(
    DecoderConfig(
        num_layers=40,
        hidden_size=5120,
        ffn_hidden_size=32768,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=128,
        vocab_size=131072,
    ),
    EncoderConfig(num_layers=32, hidden_size=1280, ffn_hidden_size=5120, num_attention_heads=20),
    audio_token_id=24,
    projector_stack=4,
    hf_architecture="voxtral",
)


def _refused(match: str, **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        validate_parallelism(VOXTRAL_SMALL, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_encoder_tp_must_divide_its_heads() -> None:
    msg = _refused("tensor_model_parallel_size=3", tp=3)
    assert "audio encoder's 20 attention heads" in msg and "[1, 2, 4, 5, 10, 20]" in msg
    msg = _refused("tensor_model_parallel_size=8", tp=8)  # fine for the decoder, not for 20 heads
    assert "[1, 2, 4, 5, 10, 20]" in msg
    validate_parallelism(VOXTRAL_SMALL, tp=8, with_audio=False)  # text-only: 8 KV groups allow TP=8


def test_decoder_tp_must_divide_kv_groups() -> None:
    msg = _refused("tensor_model_parallel_size=5", tp=5)
    assert "8 KV groups" in msg and "[1, 2, 4, 8]" in msg


def test_context_parallel_needs_transformer_engine() -> None:
    msg = _refused("context_parallel_size=2", tp=2, cp=2, backend="local")
    assert "local attention has no context parallelism" in msg and "allowed here: 1" in msg
    validate_parallelism(VOXTRAL_SMALL, tp=2, cp=2, backend="te")  # with audio: chunk parallelism (cp_audio.py)
    validate_parallelism(VOXTRAL_SMALL, tp=2, cp=2, with_audio=False, backend="te")


def test_pipeline_must_divide_layers() -> None:
    _refused("pipeline_model_parallel_size=3", tp=1, pp=3)
    validate_parallelism(VOXTRAL_SMALL, tp=4, pp=4)


def test_yarn_settings_missing() -> None:
    with pytest.raises(ConfigError, match="YaRN settings are missing: .*beta_fast"):
        RopeConfig(type="yarn", factor=48.0, original_max_position_embeddings=8192)
    data = VOXTRAL_SMALL.to_dict()
    data["decoder"]["rope"] = {"theta": 1e8, "type": "yarn", "factor": 48.0}
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        ModelConfig.from_dict(data)


def test_backend_and_fp8_settings() -> None:
    if te_available():
        pytest.skip("CUDA + Transformer Engine present")
    assert resolve_backend("auto") == "local"
    with pytest.raises(ConfigError, match="backend='te' needs CUDA and Transformer Engine"):
        resolve_backend("te")
    with pytest.raises(ConfigError, match="fp8.recipe='mxfp9'"):
        FP8Config(recipe="mxfp9")
