"""Model, parallel-layout and training configs refuse ill-typed, out-of-range and non-finite values by name."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from megatron_ext.config import ConfigError, ModelConfig, RopeConfig
from megatron_ext.parallel_layout import validate_parallelism
from megatron_ext.testing.tiny_models import DEVSTRAL2, TINY_DEVSTRAL2_ROPE, VOXTRAL
from megatron_ext.training.config import TrainConfigError, load_config

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"theta": NAN}, "rope.theta"),
        ({"theta": INF}, "rope.theta"),
        ({"theta": -1.0}, "rope.theta"),
        ({"theta": 0.0}, "rope.theta"),
        ({"theta": "1e8"}, "rope.theta"),
        ({"factor": NAN}, "rope.factor"),
        ({"factor": 0.0}, "rope.factor"),
        ({"beta_fast": INF}, "rope.beta_fast"),
        ({"mscale": -1.0}, "rope.mscale"),
        ({"llama4_scaling_beta": NAN}, "rope.llama4_scaling_beta"),
        ({"original_max_position_embeddings": 0}, "rope.original_max_position_embeddings"),
        ({"original_max_position_embeddings": 32.5}, "rope.original_max_position_embeddings"),
        ({"truncate": "yes"}, "rope.truncate"),
    ],
)
def test_rope_values_are_checked(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}="):
        dataclasses.replace(TINY_DEVSTRAL2_ROPE, **changes)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_attention_heads", "8"),
        ("num_query_groups", 0),
        ("num_layers", -2),
        ("num_layers", True),
        ("hidden_size", 96.0),
        ("vocab_size", 0),
        ("norm_eps", NAN),
        ("norm_eps", 0.0),
        ("max_position_embeddings", -1),
    ],
)
def test_decoder_values_are_checked(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^decoder\.{field}="):
        dataclasses.replace(VOXTRAL.decoder, **{field: value})


@pytest.mark.parametrize(
    ("field", "value"), [("num_layers", 0), ("num_mel_bins", "128"), ("norm_eps", INF), ("max_source_positions", -5)]
)
def test_encoder_values_are_checked(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^encoder\.{field}="):
        dataclasses.replace(VOXTRAL.encoder, **{field: value})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"audio_token_id": -1}, "^audio_token_id="),
        ({"audio_token_id": 10**9}, "outside the vocabulary"),
        ({"projector_stack": 0}, "^projector_stack="),
        ({"hf_architecture": "llama"}, "^hf_architecture="),
    ],
)
def test_model_values_are_checked(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(VOXTRAL, **changes)


def test_hf_config_json_values_are_checked() -> None:
    """A config.json as the hub writes it, with one value wrong at a time."""
    good = DEVSTRAL2.to_hf()
    assert ModelConfig.from_hf(good) == DEVSTRAL2
    for key, value, field in (
        ("num_attention_heads", "8", "decoder.num_attention_heads"),
        ("num_key_value_heads", 0, "decoder.num_query_groups"),
        ("num_hidden_layers", -2, "decoder.num_layers"),
    ):
        bad = json.loads(json.dumps(good))
        text = bad.get("text_config", bad)
        text[key] = value
        with pytest.raises(ConfigError, match=field):
            ModelConfig.from_hf(bad)


def test_stored_metadata_with_a_nan_rope_is_refused() -> None:
    data = VOXTRAL.to_dict()
    data["decoder"]["rope"]["theta"] = NAN
    with pytest.raises(ConfigError, match="rope.theta=nan"):
        ModelConfig.from_dict(data)
    assert RopeConfig(theta=1e8).theta == 1e8


@pytest.mark.parametrize(("tp", "pp"), [(0, 1), (-2, 1), (1, 0), (1, -1), ("2", 1)])
def test_parallel_sizes_must_be_positive_integers(tp: object, pp: object) -> None:
    with pytest.raises(ConfigError, match=r"_model_parallel_size=.*must be an integer >= 1"):
        validate_parallelism(VOXTRAL, tp=tp, pp=pp)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optimizer.lr=-1", "optimizer.lr"),
        ("optimizer.lr=.nan", "optimizer.lr"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.adam_beta2=1.0", "optimizer.adam_beta2"),
        ("optimizer.adam_eps=.inf", "optimizer.adam_eps"),
        ("optimizer.clip_grad=-0.5", "optimizer.clip_grad"),
        ("optimizer.weight_decay=.nan", "optimizer.weight_decay"),
        ("optimizer.warmup_steps=-1", "optimizer.warmup_steps"),
        ("optimizer.min_lr_ratio=.nan", "optimizer.min_lr_ratio"),
        ("data.sources.0.ratio=.nan", "data.sources[0].ratio"),
        ("data.sources.0.epochs=.inf", "data.sources[0].epochs"),
    ],
)
def test_training_values_are_checked(override: str, key: str) -> None:
    config = Path(__file__).resolve().parents[1] / "examples/configs/tiny_cpu.yaml"
    with pytest.raises(TrainConfigError, match="^" + re.escape(key) + ": "):
        load_config(config, [override])
