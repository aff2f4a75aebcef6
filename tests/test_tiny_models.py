"""Tiny parents: deterministic bytes, loadable by HF transformers, real Tekken tokenizers, native layout."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from megatron_ext.checkpoint.mistral_native import (
    config_from_params,
    convert_name,
    interleaved_to_half,
    rope_heads,
)
from megatron_ext.config import ConfigError, ModelConfig, RopeConfig
from megatron_ext.testing.tiny_models import DEVSTRAL, DEVSTRAL2, DEVSTRAL2507, VOXTRAL, build_tiny_models

HF_CLASSES = {
    "voxtral-hf": "VoxtralForConditionalGeneration",
    "devstral-hf": "MistralForCausalLM",
    "devstral2-hf": "Mistral3ForConditionalGeneration",
    "base-hf": "MistralForCausalLM",
    "voxtral-hf-sharded": "VoxtralForConditionalGeneration",
    "devstral2507-hf": "MistralForCausalLM",
}


def test_generation_is_byte_identical_per_seed(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_models(tmp_path / "again", seed=0)
    first = json.loads((tiny_dir / "MANIFEST.json").read_text())["files"]
    assert again == first
    other = build_tiny_models(tmp_path / "other", seed=1)
    assert other["voxtral-hf/model.safetensors"] != first["voxtral-hf/model.safetensors"]
    assert other["voxtral-hf/tekken.json"] == first["voxtral-hf/tekken.json"]  # tokenizers do not depend on seed


@pytest.mark.parametrize("name", sorted(HF_CLASSES))
def test_hf_transformers_loads_every_tensor(tiny_dir: Path, name: str) -> None:
    import transformers

    cls = getattr(transformers, HF_CLASSES[name])
    model, info = cls.from_pretrained(tiny_dir / name, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    logits = model(input_ids=torch.tensor([[1, 3, 1500, 1200, 1001, 4]])).logits
    assert logits.shape == (1, 6, 2048)
    assert torch.isfinite(logits).all()


def test_parents_share_a_base_with_different_deltas(tiny_dir: Path) -> None:
    base = load_file(tiny_dir / "base-hf/model.safetensors")
    dev = load_file(tiny_dir / "devstral-hf/model.safetensors")
    vox = load_file(tiny_dir / "voxtral-hf/model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    d_dev = (dev[name] - base[name]).norm() / base[name].norm()
    d_vox = (vox["language_model." + name] - base[name]).norm() / base[name].norm()
    assert 0.01 < d_dev < d_vox < 0.5
    # Norm weights are random too, so a norm mapping error changes the logits.
    assert base["model.layers.0.input_layernorm.weight"].std() > 0.05
    # Audio-only specials: trained rows in Voxtral, zero placeholders in Devstral.
    assert vox["language_model.model.embed_tokens.weight"][24].norm() > 1
    assert dev["model.embed_tokens.weight"][24].norm() == 0
    assert vox["audio_tower.layers.0.self_attn.q_proj.bias"].shape == (64,)
    assert "audio_tower.layers.0.self_attn.k_proj.bias" not in vox


def _sharded(directory: Path, stem: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob(f"{stem}-0000*-of-00002.safetensors")):
        out |= load_file(f)
    return out


def test_devstral2_hf_is_the_published_mistral3_fp8_layout(tiny_dir: Path) -> None:
    d = tiny_dir / "devstral2-hf"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    sd = _sharded(d, "model")
    assert set(index["weight_map"]) == set(sd) and len(set(index["weight_map"].values())) == 2
    w = sd["language_model.model.layers.0.self_attn.q_proj.weight"]
    scale = sd["language_model.model.layers.0.self_attn.q_proj.weight_scale_inv"]
    act = sd["language_model.model.layers.1.mlp.down_proj.activation_scale"]
    assert w.dtype == torch.float8_e4m3fn and scale.shape == () and act.shape == () and scale.dtype == torch.float32
    fp8 = {n for n, t in sd.items() if t.dtype == torch.float8_e4m3fn}
    assert len(fp8) == 2 * 7 and all(".layers." in n for n in fp8)  # text linears only
    assert sd["language_model.lm_head.weight"].dtype == torch.float32  # in modules_to_not_convert
    assert sd["vision_tower.patch_conv.weight"].dtype == torch.float32
    assert "multi_modal_projector.patch_merger.merging_layer.weight" in sd
    assert (w.to(torch.float32) * scale).abs().max() <= 448 * scale
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["Mistral3ForConditionalGeneration"] and cfg["model_type"] == "mistral3"
    assert cfg["tie_word_embeddings"] is False and "architectures" not in cfg["text_config"]
    assert cfg["quantization_config"] == {
        "activation_scheme": "static",
        "dequantize": False,
        "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
        "quant_method": "fp8",
        "weight_block_size": None,
    }
    text = cfg["text_config"]
    rope = text["rope_parameters"]
    assert text["model_type"] == "ministral3" and rope["type"] == rope["rope_type"] == "yarn"
    assert (rope["factor"], rope["beta_fast"], rope["beta_slow"], rope["rope_theta"]) == (48.0, 32.0, 1.0, 1e8)
    assert (rope["mscale"], rope["mscale_all_dim"], rope["llama_4_scaling_beta"]) == (1.0, 1.0, 0.1)
    assert text["max_position_embeddings"] == 48 * rope["original_max_position_embeddings"] == 48 * 32
    assert cfg["vision_config"]["model_type"] == "pixtral"


def test_devstral2_native_is_the_published_split_layout(tiny_dir: Path) -> None:
    d = tiny_dir / "devstral2-native"
    sd = _sharded(d, "consolidated")
    assert {f.name for f in d.iterdir()} == {
        "consolidated-00001-of-00002.safetensors",
        "consolidated-00002-of-00002.safetensors",
        "params.json",
        "tekken.json",
    }
    assert sd["layers.0.attention.wq.weight"].dtype == torch.float8_e4m3fn
    assert sd["layers.0.attention.wq.qscale_weight"].shape == sd["layers.0.feed_forward.w2.qscale_act"].shape == ()
    for name in ("vision_encoder.transformer.layers.0.attention.wq.weight", "vision_language_adapter.w_in.weight"):
        assert name in sd
    assert "patch_merger.merging_layer.weight" in sd and "pre_mm_projector_norm.weight" in sd
    params = json.loads((d / "params.json").read_text())
    assert set(params["yarn"]) == {"factor", "original_max_position_embeddings", "beta", "alpha", "apply_scale"}
    assert set(params["llama_4_scaling"]) == {"original_max_position_embeddings", "beta"}
    assert params["quantization"] == {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}
    vision = params["vision_encoder"]
    assert (vision["mm_projector_id"], vision["add_pre_mm_projector_layer_norm"]) == ("patch_merge", True)
    assert config_from_params(params, "ministral3") == DEVSTRAL2


def test_voxtral_and_devstral2507_native_params_as_published(tiny_dir: Path) -> None:
    vox = json.loads((tiny_dir / "voxtral-native/params.json").read_text())
    whisper = vox["multimodal"]["whisper_model_args"]
    assert set(whisper["encoder_args"]["audio_encoding_args"]) == {
        "num_mel_bins",
        "window_size",
        "sampling_rate",
        "hop_length",
    }
    assert whisper["downsample_args"] == {"downsample_factor": 4}
    assert config_from_params(vox, "voxtral") == VOXTRAL
    dev = json.loads((tiny_dir / "devstral2507-native/params.json").read_text())
    assert list(dev) == [
        "dim",
        "n_layers",
        "head_dim",
        "hidden_dim",
        "n_heads",
        "n_kv_heads",
        "rope_theta",
        "norm_eps",
        "vocab_size",
    ]
    assert dev["rope_theta"] == 1e9 and config_from_params(dev, "mistral") == DEVSTRAL2507


@pytest.mark.parametrize("cfg", [VOXTRAL, DEVSTRAL, DEVSTRAL2], ids=["voxtral", "devstral", "devstral2"])
def test_model_config_round_trips(cfg: ModelConfig) -> None:
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_yarn_without_its_settings_is_refused() -> None:
    with pytest.raises(ConfigError, match="beta_fast"):
        RopeConfig(
            type="yarn",
            factor=48.0,
            original_max_position_embeddings=8192,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        )
    data = DEVSTRAL.to_dict()
    del data["decoder"]["rope"]
    with pytest.raises(ConfigError, match="rope"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize("parent", ["voxtral", "devstral"])
def test_native_layout_matches_hf(tiny_dir: Path, parent: str) -> None:
    native = load_file(tiny_dir / f"{parent}-native/consolidated.safetensors")
    hf = load_file(tiny_dir / f"{parent}-hf/model.safetensors")
    cfg = config_from_params(
        json.loads((tiny_dir / f"{parent}-native/params.json").read_text()),
        "voxtral" if parent == "voxtral" else "mistral",
    )
    assert cfg == (VOXTRAL if parent == "voxtral" else DEVSTRAL)
    seen = set()
    for name, t in native.items():
        hf_name = convert_name(name, cfg.hf_architecture, to_hf=True)
        heads = rope_heads(hf_name, cfg)
        assert torch.equal(interleaved_to_half(t, heads) if heads else t, hf[hf_name]), name
        seen.add(hf_name)
    assert set(hf) - seen <= {"audio_tower.embed_positions.weight"}
    if parent == "voxtral":
        assert "mm_whisper_embeddings.tok_embeddings.weight" in native
        q = native["layers.0.attention.wq.weight"]
        assert not torch.equal(q, hf["language_model.model.layers.0.self_attn.q_proj.weight"])  # really permuted


def _tokenizer(path: Path):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(path))


def test_tokenizers_round_trip_text_and_specials(tiny_dir: Path) -> None:
    text = "Fix the failing test in src/utils/parse.py: ValueError: invalid literal for int() with base 10: 'x'"
    vox = _tokenizer(tiny_dir / "voxtral-hf/tekken.json").instruct_tokenizer.tokenizer
    dev = _tokenizer(tiny_dir / "devstral-hf/tekken.json").instruct_tokenizer.tokenizer
    for tok in (vox, dev):
        assert tok.n_words == 2048
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and all(i < 2048 for i in ids)
        assert tok.decode(ids) == text
        assert tok.get_special_token("[INST]") == 3 and tok.get_special_token("[TOOL_CALLS]") == 9
    assert vox.encode(text, bos=False, eos=False) == dev.encode(text, bos=False, eos=False)
    assert (vox.get_special_token("[AUDIO]"), vox.get_special_token("[BEGIN_AUDIO]")) == (24, 25)
    assert vox.get_special_token("[TRANSCRIBE]") == 34
    assert (dev.get_special_token("[ARGS]"), dev.get_special_token("[CALL_ID]")) == (32, 33)
    assert dev.id_to_piece(24) == "<SPECIAL_24>"
    with pytest.raises(ValueError):
        dev.get_special_token("[AUDIO]")


def test_voxtral_tokenizer_encodes_audio_chat(tiny_dir: Path) -> None:
    from mistral_common.audio import Audio
    from mistral_common.protocol.instruct.chunk import AudioChunk, TextChunk
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.random.default_rng(0).standard_normal(16000 * 31)).astype(np.float32), 16000, format="WAV")
    audio = Audio.from_base64(base64.b64encode(buf.getvalue()).decode())
    req = ChatCompletionRequest(messages=[UserMessage(content=[AudioChunk.from_audio(audio), TextChunk(text="hi")])])
    tokens = _tokenizer(tiny_dir / "voxtral-hf/tekken.json").encode_chat_completion(req).tokens
    assert tokens[:4] == [1, 3, 25, 24]
    assert tokens.count(24) == 2 * 375  # 31 s pads to two 30 s chunks of 375 audio tokens
