"""HF / Mistral-native -> torch_dist -> HF / Mistral-native round trips on the tiny parents, bit-exact.

FP8 inputs (tiny Devstral-2) must come back as exactly their dequantised values
(fp8.float() * weight_scale_inv, cast to the config dtype). The torch_dist layout is TP-agnostic, so
the same tensors must come out whatever --tp was validated (TP=2 loading is tests/test_convert_megatron.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_ext.checkpoint import mapping
from megatron_ext.checkpoint.convert import convert
from megatron_ext.checkpoint.metadata import read_meta, sha256_file
from megatron_ext.checkpoint.safetensors_io import SafetensorsSource
from megatron_ext.checkpoint.safetensors_writer import SafetensorsWriter
from megatron_ext.checkpoint.source import open_checkpoint
from megatron_ext.checkpoint.torch_dist_io import TorchDistReader
from megatron_ext.testing.tiny_models import DEVSTRAL, DEVSTRAL2, VOXTRAL

MODELS = {"voxtral": VOXTRAL, "devstral": DEVSTRAL, "devstral2": DEVSTRAL2}


def _hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    src = SafetensorsSource(d)
    return {n: src.get(n) for n in src.names()}


def _dequantised(d: Path) -> dict[str, torch.Tensor]:
    """The reference, read by hand: every FP8 weight times its scale, in the config's dtype; scales dropped;
    a Mistral3 parent's text tensors under CausalLM names, its vision tower and projector left out."""
    raw: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("model*.safetensors")):
        raw |= load_file(f)
    mistral3 = json.loads((d / "config.json").read_text())["model_type"] == "mistral3"
    out = {}
    for name, t in raw.items():
        vision = mistral3 and name.startswith(("vision_tower.", "multi_modal_projector."))
        if vision or name.endswith(("_scale_inv", "activation_scale")):
            continue
        scale = raw.get(name + "_scale_inv")
        key = name.removeprefix("language_model.") if mistral3 else name
        out[key] = (t.float() * scale.float()).to(torch.float32) if scale is not None else t
    return out


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("model", ["voxtral", "devstral", "devstral2"])
def test_hf_torch_dist_hf_is_bit_exact(model: str, tp: int, tiny_dir: Path, out: Path) -> None:
    td, hf = out / f"{model}-td{tp}", out / f"{model}-hf{tp}"
    convert(tiny_dir / f"{model}-hf", td, "megatron", tp=tp, progress=False)
    convert(td, hf, "hf", progress=False)
    _assert_same(load_file(hf / "model.safetensors"), _dequantised(tiny_dir / f"{model}-hf"))
    meta = read_meta(td)
    assert meta.model == MODELS[model]  # rope / YaRN / llama-4 scaling and the audio stack survive
    assert meta.parallel == {"tp": tp, "pp": 1}
    assert sorted(TorchDistReader(td).names()) == sorted(mapping.megatron_names(MODELS[model]))


def test_metadata_records_parts_tokenizer_sources_command(tiny_dir: Path, out: Path) -> None:
    td = out / "meta-vox"
    convert(tiny_dir / "voxtral-hf", td, "megatron", progress=False, command="convert --test")
    data = json.loads((td / "release" / "checkpoint_meta.json").read_text())
    assert data["parts"] == {"language_model": True, "audio_encoder": True, "audio_projector": True}
    assert data["tokenizer"] == {"file": "tekken.json", "sha256": sha256_file(tiny_dir / "voxtral-hf" / "tekken.json")}
    assert {Path(s["path"]).name: s["sha256"] for s in data["sources"]}["model.safetensors"] == sha256_file(
        tiny_dir / "voxtral-hf" / "model.safetensors"
    )
    assert data["command"] == "convert --test"
    d2 = json.loads((out / "devstral2-td1" / "release" / "checkpoint_meta.json").read_text())
    assert d2["parts"]["audio_encoder"] is False
    rope = d2["model"]["decoder"]["rope"]
    assert (rope["type"], rope["factor"], rope["llama4_scaling_beta"]) == ("yarn", 48.0, 0.1)
    # The published Mistral3 parent: vision parts dropped and FP8 activation scales recorded.
    assert d2["extra"]["parts_dropped"] == ["multi_modal_projector", "vision_tower"]
    scales = d2["extra"]["fp8"]["activation_scales"]
    src = load_file(tiny_dir / "devstral2-hf" / "model-00001-of-00002.safetensors")
    name = next(n for n in src if n.endswith("activation_scale"))
    key = name.removeprefix("language_model.").removesuffix("activation_scale") + "weight"
    assert len(scales) == 14 and scales[key] == src[name].item()
    assert "parts_dropped" not in data["extra"] and "fp8" not in data["extra"]


@pytest.mark.parametrize("model", ["voxtral", "devstral", "devstral2", "devstral2507"])
def test_native_path_equals_hf_path(model: str, tiny_dir: Path, out: Path) -> None:
    """native -> torch_dist -> HF gives the same tensors and config.json as HF -> torch_dist -> HF."""
    results = []
    for layout in ("native", "hf"):
        td, hf = out / f"{model}-{layout}-td", out / f"{model}-{layout}-hf"
        if not hf.exists():
            convert(tiny_dir / f"{model}-{layout}", td, "megatron", progress=False)
            convert(td, hf, "hf", progress=False)
        results.append(hf)
    native, ref = results
    _assert_same(load_file(native / "model.safetensors"), load_file(ref / "model.safetensors"))
    assert (native / "config.json").read_bytes() == (ref / "config.json").read_bytes()


@pytest.mark.parametrize("model", ["voxtral", "devstral"])
def test_mistral_export_equals_native_files(model: str, tiny_dir: Path, out: Path) -> None:
    native = out / f"{model}-mistral"
    convert(out / f"{model}-td1", native, "mistral", progress=False)
    ref = tiny_dir / f"{model}-native"
    _assert_same(load_file(native / "consolidated.safetensors"), load_file(ref / "consolidated.safetensors"))
    assert open_checkpoint(native).cfg == open_checkpoint(ref).cfg  # the stand-in's params.json has published keys


def test_hf_export_loads_in_transformers_with_same_logits(tiny_dir: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, Mistral3ForConditionalGeneration, VoxtralForConditionalGeneration

    ids = torch.randint(1000, 2048, (1, 40), generator=torch.Generator().manual_seed(0))  # past Devstral 2's 32
    for model, cls, ref_cls in (
        ("devstral", AutoModelForCausalLM, AutoModelForCausalLM),
        ("devstral2", AutoModelForCausalLM, Mistral3ForConditionalGeneration),  # published FP8 Mistral3 in
        ("voxtral", VoxtralForConditionalGeneration, VoxtralForConditionalGeneration),
    ):
        m, info = cls.from_pretrained(out / f"{model}-hf2", dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (model, info)
        ref = ref_cls.from_pretrained(tiny_dir / f"{model}-hf", dtype=torch.float32)
        with torch.no_grad():
            diff = (m(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
        assert diff <= 1e-5, (model, diff)


def test_torch_dist_reshard_is_validated_copy(out: Path) -> None:
    td2 = out / "devstral-reshard-tp2"
    convert(out / "devstral-td1", td2, "megatron", tp=2, progress=False)
    a, b = TorchDistReader(out / "devstral-td1"), TorchDistReader(td2)
    _assert_same(dict(b.items()), dict(a.items()))
    assert read_meta(td2).parallel == {"tp": 2, "pp": 1}


def test_sharded_hf_input_with_index(tiny_dir: Path, out: Path) -> None:
    src_dir = out / "devstral-sharded-in"
    src_dir.mkdir()
    tensors = _hf_tensors(tiny_dir / "devstral-hf")
    w = SafetensorsWriter(src_dir, tensors, max_shard_bytes=1 << 20)
    for n, t in tensors.items():
        w.write(n, t)
    assert len(w.finish()) > 1
    for f in ("config.json", "tekken.json"):
        (src_dir / f).write_bytes((tiny_dir / "devstral-hf" / f).read_bytes())
    convert(src_dir, out / "sharded-td", "megatron", progress=False)
    convert(out / "sharded-td", out / "sharded-hf", "hf", progress=False)
    _assert_same(load_file(out / "sharded-hf" / "model.safetensors"), tensors)
