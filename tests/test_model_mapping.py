"""HF <-> Megatron name mapping: exact round trips on the tiny parents, GQA order, Whisper k-bias fill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_ext.checkpoint import mapping
from megatron_ext.checkpoint.source import open_checkpoint
from megatron_ext.config import ModelConfig
from megatron_ext.testing.tiny_models import DEVSTRAL, DEVSTRAL2, DEVSTRAL2507, VOXTRAL


def _read(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize(
    ("subdir", "cfg"),
    [("voxtral-hf", VOXTRAL), ("devstral-hf", DEVSTRAL), ("base-hf", DEVSTRAL), ("devstral2507-hf", DEVSTRAL2507)],
)
def test_round_trip_is_bit_exact(tiny_dir: Path, subdir: str, cfg: ModelConfig) -> None:
    src = open_checkpoint(tiny_dir / subdir)  # sharded or not, under HF names
    hf = mapped = {n: src.get(n) for n in src.names}
    assert set(mapping.hf_names(cfg)) == set(mapped)
    meg = dict(mapping.hf_to_megatron(cfg, hf.__getitem__))
    assert list(meg) == mapping.megatron_names(cfg)
    back = dict(mapping.megatron_to_hf(cfg, meg.__getitem__))
    assert set(back) == set(mapped)
    for name, t in mapped.items():
        assert back[name].dtype == t.dtype, name
        assert torch.equal(back[name].view(torch.uint8), t.view(torch.uint8)), name


def test_megatron_names_follow_the_contract() -> None:
    names = set(mapping.megatron_names(VOXTRAL))
    for expected in (
        "language_model.embedding.word_embeddings.weight",
        "language_model.decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
        "language_model.decoder.layers.0.mlp.linear_fc1.weight",
        "language_model.output_layer.weight",
        "audio_encoder.conv2.bias",
        "audio_encoder.decoder.layers.1.self_attention.linear_qkv.bias",
        "audio_encoder.decoder.layers.0.mlp.linear_fc1.layer_norm_bias",
        "audio_encoder.decoder.final_layernorm.weight",
        "audio_projector.encoder.linear_fc2.weight",
    ):
        assert expected in names
    assert not any(n.startswith("audio") for n in mapping.megatron_names(DEVSTRAL))
    assert all(n.startswith("model.") or n == "lm_head.weight" for n in mapping.hf_names(DEVSTRAL2))


def test_gqa_order_and_zero_k_bias(tiny_dir: Path) -> None:
    hf = _read(tiny_dir / "voxtral-hf")
    meg = dict(mapping.hf_to_megatron(VOXTRAL, hf.__getitem__))
    d = VOXTRAL.decoder
    hd, r = d.kv_channels, d.num_attention_heads // d.num_query_groups
    qkv = meg["language_model.decoder.layers.0.self_attention.linear_qkv.weight"]
    pre = "language_model.model.layers.0.self_attn."
    block = (r + 2) * hd
    g = 1  # second group: q heads 4..7, then k_1, then v_1
    assert torch.equal(qkv[g * block : g * block + r * hd], hf[pre + "q_proj.weight"][g * r * hd : (g + 1) * r * hd])
    k_rows = qkv[g * block + r * hd : g * block + (r + 1) * hd]
    assert torch.equal(k_rows, hf[pre + "k_proj.weight"][g * hd : (g + 1) * hd])
    assert torch.equal(qkv[(g + 1) * block - hd : (g + 1) * block], hf[pre + "v_proj.weight"][g * hd : (g + 1) * hd])
    fc1 = meg["language_model.decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[: d.ffn_hidden_size], hf["language_model.model.layers.0.mlp.gate_proj.weight"])

    e = VOXTRAL.encoder
    ehd = e.hidden_size // e.num_attention_heads
    bias = meg["audio_encoder.decoder.layers.0.self_attention.linear_qkv.bias"].reshape(e.num_attention_heads, 3, ehd)
    assert torch.equal(bias[:, 1], torch.zeros(e.num_attention_heads, ehd))
    assert torch.equal(bias[:, 0].flatten(), hf["audio_tower.layers.0.self_attn.q_proj.bias"])
    assert torch.equal(bias[:, 2].flatten(), hf["audio_tower.layers.0.self_attn.v_proj.bias"])


def test_bad_shape_names_the_tensor(tiny_dir: Path) -> None:
    hf = _read(tiny_dir / "devstral-hf")
    hf["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(5, 96)
    with pytest.raises(mapping.MappingError, match="layers.1.self_attention.linear_qkv.weight"):
        dict(mapping.hf_to_megatron(DEVSTRAL, hf.__getitem__))


def test_megatron_getter_reads_only_what_it_needs(tiny_dir: Path) -> None:
    hf = _read(tiny_dir / "voxtral-hf")
    reads: list[str] = []

    def get(name: str) -> torch.Tensor:
        reads.append(name)
        return hf[name]

    full = dict(mapping.hf_to_megatron(VOXTRAL, hf.__getitem__))
    one = mapping.megatron_getter(VOXTRAL, get)
    name = "audio_encoder.decoder.layers.1.self_attention.linear_qkv.bias"
    assert torch.equal(one(name), full[name])
    assert reads == ["audio_tower.layers.1.self_attn.q_proj.bias", "audio_tower.layers.1.self_attn.v_proj.bias"]
    with pytest.raises(KeyError):
        one("language_model.no.such.tensor")
