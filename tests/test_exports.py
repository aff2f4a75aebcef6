"""Exports their consumers accept: Mistral-native for vLLM (conformance with vLLM's own reader), HF with the
files transformers' Voxtral processor needs, and the one-line refusals of issue 18."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.convert import convert
from megatron_ext.merge.methods import MergeParams
from megatron_ext.merge.run import MergeError, MergeJob, run_merge
from megatron_ext.models.logits import checkpoint_logits

ROOT = Path(__file__).resolve().parents[1]
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0930.wav")
TOL = 1e-5  # fp32 on CPU, same weights: only summation order differs

# ---- what vLLM reads from a Mistral-native Voxtral --------------------------------------------------------
# Read from vllm-project/vllm (pip release 0.11.0 and main @ 01da88c5 / 00955cff):
#   vllm/transformers_utils/configs/mistral.py  (adapt_config_dict, _remap_general_mistral_args,
#       _remap_mistral_yarn_args, the llama_4_scaling check, _remap_mistral_audio_args)
#   vllm/model_executor/models/voxtral.py       (VoxtralForConditionalGeneration.load_weights,
#       VoxtralEncoderModel.mistral_remapping) and models/mistral.py (MistralForCausalLM.mistral_mapping).
# vLLM itself cannot be installed here: every release pins a CUDA torch (0.11.0 -> torch 2.8.0 + nvidia-*).
VLLM_TOP_LEVEL = {"dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "head_dim", "norm_eps", "vocab_size"}
VLLM_TOP_LEVEL |= {"rope_theta", "max_seq_len", "max_position_embeddings"}
VLLM_YARN = {"factor", "original_max_position_embeddings", "beta", "alpha", "apply_scale"}  # asserts nothing else
VLLM_LLAMA4 = {"original_max_position_embeddings", "beta"}
VLLM_ENCODER = {"dim", "n_layers", "hidden_dim", "n_heads", "head_dim", "vocab_size"}  # indexed, no defaults
VLLM_AUDIO_ENCODING = {"num_mel_bins", "window_size", "sampling_rate", "hop_length"}
# Tensor names vLLM's Voxtral loader routes (encoder: whisper remapping; adapter; LM: Mistral mapping).
VLLM_NAMES = [
    r"mm_whisper_embeddings\.whisper_encoder\.conv_layers\.[01]\.(weight|bias)",
    r"mm_whisper_embeddings\.whisper_encoder\.transformer\.layers\.\d+\.attention\.w[qvo]\.(weight|bias)",
    r"mm_whisper_embeddings\.whisper_encoder\.transformer\.layers\.\d+\.attention\.wk\.weight",  # bias made by vLLM
    r"mm_whisper_embeddings\.whisper_encoder\.transformer\.layers\.\d+\.(attention_norm|ffn_norm)\.(weight|bias)",
    r"mm_whisper_embeddings\.whisper_encoder\.transformer\.layers\.\d+\.feed_forward\.w[12]\.(weight|bias)",
    r"mm_whisper_embeddings\.whisper_encoder\.transformer\.norm\.(weight|bias)",
    r"mm_whisper_embeddings\.audio_language_projection\.[02]\.weight",
    r"mm_whisper_embeddings\.tok_embeddings\.weight",
    r"layers\.\d+\.attention\.w[qkvo]\.weight",
    r"layers\.\d+\.(attention_norm|ffn_norm)\.weight",
    r"layers\.\d+\.feed_forward\.w[123]\.weight",
    r"(norm|output)\.weight",
]


def _native_names(directory: Path) -> set[str]:
    names: set[str] = set()
    for f in directory.glob("consolidated*.safetensors"):
        with safe_open(f, "pt") as sf:
            names |= set(sf.keys())
    return names


def check_vllm_conformance(directory: Path) -> dict:
    """Assert that `directory` holds every params.json key and only tensor names vLLM's Voxtral path reads."""
    params = json.loads((directory / "params.json").read_text())
    assert VLLM_TOP_LEVEL <= params.keys()
    if "yarn" in params:
        assert set(params["yarn"]) == VLLM_YARN
        assert int(params["yarn"]["original_max_position_embeddings"]) > 0 and float(params["yarn"]["factor"]) >= 1
    if "llama_4_scaling" in params:
        assert set(params["llama_4_scaling"]) == VLLM_LLAMA4
    assert "vision_encoder" not in params  # vLLM: vision and audio are mutually exclusive
    whisper = params["multimodal"]["whisper_model_args"]
    enc = whisper["encoder_args"]
    assert VLLM_ENCODER <= enc.keys() and set(enc["audio_encoding_args"]) == VLLM_AUDIO_ENCODING
    assert isinstance(whisper["downsample_args"]["downsample_factor"], int)
    assert enc.get("max_source_positions") is not None and not enc.get("causal", False)
    names = _native_names(directory)
    unread = [n for n in names if not any(re.fullmatch(p, n) for p in VLLM_NAMES)]
    assert not unread, unread
    layers, enc_layers = params["n_layers"], enc["n_layers"]
    assert len({n for n in names if n.startswith("layers.")}) == 9 * layers
    assert (
        len({n for n in names if ".transformer.layers." in n}) == 15 * enc_layers
    )  # q, v, o and norms with biases; wk without
    # vLLM takes max_audio_clip_s and the sampling rate from the tokenizer's audio section (mistral-common).
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    audio = MistralTokenizer.from_file(str(directory / "tekken.json")).instruct_tokenizer.audio_encoder.audio_config
    assert audio.sampling_rate == enc["audio_encoding_args"]["sampling_rate"]
    assert audio.encoding_config.hop_length == enc["audio_encoding_args"]["hop_length"]
    return params


@pytest.fixture(scope="module")
def merged_native(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The paper's model in tiny: Devstral 2 (YaRN + llama-4 scaling) + Voxtral, linear 0.1, Mistral-native."""
    out = tmp_path_factory.mktemp("merge") / "m-mistral"
    job = MergeJob(
        devstral=tiny_dir / "devstral2-hf",
        voxtral=tiny_dir / "voxtral-hf",
        output=out,
        params=MergeParams(method="linear", alpha=0.1),
        rope_from="devstral",
        out_format="mistral",
        progress=False,
    )
    run_merge(job)
    return out


def test_merged_native_export_conforms_to_vllm(merged_native: Path) -> None:
    params = check_vllm_conformance(merged_native)
    assert params["yarn"]["factor"] == 48.0 and params["llama_4_scaling"]["beta"] == 0.1
    assert {p.name for p in merged_native.iterdir()} == {
        "consolidated.safetensors",
        "params.json",
        "tekken.json",
        "merge.json",
        "tokenizer_map.json",
    }
    assert not list(merged_native.parent.glob(".*"))  # the torch_dist stage is gone


def test_llama4_model_refused_as_hf_voxtral(merged_native: Path, tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="export it Mistral-native instead") as exc:
        convert(merged_native, tmp_path / "hf", "hf", progress=False)
    assert "\n" not in str(exc.value) and not (tmp_path / "hf").exists()
    job = MergeJob(
        devstral=tiny_dir / "devstral2-hf",
        voxtral=tiny_dir / "voxtral-hf",
        output=tmp_path / "m-hf",
        params=MergeParams(method="linear", alpha=0.1),
        rope_from="devstral",
        progress=False,
    )
    with pytest.raises(MergeError, match="llama-4 query scaling.*merge --format mistral"):
        run_merge(job)
    assert not list(tmp_path.iterdir())


def test_split_native_export_and_round_trip_to_transformers(tiny_dir: Path, tmp_path: Path) -> None:
    """Voxtral -> Mistral-native in shards -> our reader -> HF: transformers gives the source model's logits."""
    from transformers import VoxtralForConditionalGeneration

    native, hf = tmp_path / "native", tmp_path / "hf"
    convert(tiny_dir / "voxtral-hf", native, "mistral", progress=False, shard_bytes=1 << 20)
    shards = sorted(p.name for p in native.glob("consolidated*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"consolidated-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((native / "consolidated.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards) and index["metadata"]["tool"] == "convert"
    check_vllm_conformance(native)
    convert(native, hf, "hf", progress=False)
    ids = torch.tensor([[1, 3, 25] + [24] * 375 + [4, 1100, 34]])
    feats = torch.randn(1, 128, 3000, generator=torch.Generator().manual_seed(0))
    logits = []
    for d in (tiny_dir / "voxtral-hf", hf):
        model = VoxtralForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids, input_features=feats).logits)
    assert (logits[0] - logits[1]).abs().max().item() <= TOL


def test_hf_export_loads_with_processor_and_matches_megatron(tiny_dir: Path, tmp_path: Path) -> None:
    """AutoProcessor's transcription request on a real clip, through AutoModel..., equals our Megatron model."""
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    out = tmp_path / "hf"
    convert(tiny_dir / "voxtral-hf", out, "hf", progress=False)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 11)
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor.apply_transcription_request(language="en", audio=str(LIBRIVOX), model_id=str(out))
    ids = inputs["input_ids"]
    assert (ids == 24).sum().item() == 375 and ids[0, -1].item() == 34  # one 30 s chunk, then [TRANSCRIBE]
    model = AutoModelForSpeechSeq2Seq.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(**inputs).logits[0]
    ours = checkpoint_logits(out, ids[0].tolist(), [LIBRIVOX]).logits  # our own log-mel of the same clip
    assert (ours - ref).abs().max().item() <= TOL  # measured 3.9e-6 (max |logit| 4.5)


def test_devstral_hf_export_loads_with_auto_classes(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoProcessor

    out = tmp_path / "hf"
    convert(tiny_dir / "devstral-hf", out, "hf", progress=False)
    assert not (out / "preprocessor_config.json").exists()
    tokenizer = AutoProcessor.from_pretrained(out)  # a text model's processor is its tokenizer (tekken.json)
    ids = torch.tensor([tokenizer.encode("def add(a, b):")])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]
    ours = checkpoint_logits(tiny_dir / "devstral-hf", ids[0].tolist()).logits
    assert (ours - ref).abs().max().item() <= TOL
    assert model.generation_config.pad_token_id == 11


def test_export_without_audio_settings_says_how_to_supply_them(tiny_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "vox"
    shutil.copytree(tiny_dir / "voxtral-hf", src)
    tok = json.loads((src / "tekken.json").read_text())
    del tok["audio"]
    (src / "tekken.json").write_text(json.dumps(tok))
    for to in ("mistral", "hf"):
        with pytest.raises(CheckpointError, match="no 'audio' section.*copy it") as exc:
            convert(src, tmp_path / "out", to, progress=False)
        assert "\n" not in str(exc.value) and not (tmp_path / "out").exists()


def test_cli_refuses_existing_output_unless_overwrite(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cmd = [sys.executable, ROOT / "tools/convert.py", "--input", tiny_dir / "voxtral-hf", "--output", out]
    cmd += ["--to", "mistral", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error:") and str(out) in proc.stderr and (out / "keep.txt").exists()
    proc = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {"consolidated.safetensors", "params.json", "tekken.json"}


# ---- vLLM itself (make vllm-env; make test-slow) ---------------------------------------------------------
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def _hf_name_of_vllm(name: str) -> str:
    """vLLM Voxtral parameter name -> the HF Voxtral export's name for the same tensor."""
    for vllm_prefix, hf_prefix in (
        ("model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("whisper_encoder.", "audio_tower."),
    ):
        if name.startswith(vllm_prefix):
            return hf_prefix + name.removeprefix(vllm_prefix).replace(".mlp.fc", ".fc")
    return {"audio_language_adapter.w_in.weight": "multi_modal_projector.linear_1.weight"}.get(
        name, "multi_modal_projector.linear_2.weight"
    )


@pytest.mark.slow
def test_vllm_reads_the_merged_native_export(merged_native: Path, tmp_path: Path) -> None:
    """vLLM 0.11.0's adapt_config_dict and Voxtral/Llama weight mapping (with its q/k rope permutation) on the
    tiny merged model give our config and exactly the tensors of our own HF-layout export."""
    from safetensors.torch import load_file

    from megatron_ext.checkpoint.source import open_checkpoint

    if not VLLM_PYTHON.is_file():
        pytest.skip("no .venv-vllm: run `make vllm-env` (make test-slow does)")
    out = tmp_path / "vllm.safetensors"
    proc = subprocess.run(
        [VLLM_PYTHON, ROOT / "tests" / "vllm_worker.py", merged_native, out], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    src = open_checkpoint(merged_native)
    cfg = src.cfg
    assert seen["architectures"] == ["VoxtralForConditionalGeneration"] and not seen["unread"]
    assert seen["audio"]["window_size"] == 400 and seen["audio"]["hop_length"] == 160
    assert seen["audio"]["downsample_factor"] == cfg.projector_stack
    assert seen["audio"]["d_model"] == cfg.encoder.hidden_size and seen["audio"]["encoder_layers"] == 2
    t, d = seen["text"], cfg.decoder
    assert (t["hidden_size"], t["num_hidden_layers"], t["head_dim"]) == (d.hidden_size, d.num_layers, d.kv_channels)
    assert (t["num_attention_heads"], t["num_key_value_heads"]) == (d.num_attention_heads, d.num_query_groups)
    assert t["rope_scaling"]["factor"] == d.rope.factor and t["rope_scaling"]["beta_fast"] == d.rope.beta_fast
    assert t["llama_4_scaling"] == {"beta": d.rope.llama4_scaling_beta, "original_max_position_embeddings": 32}
    loaded = load_file(out)
    hf = {n: src.get(n) for n in src.names if n != "audio_tower.embed_positions.weight"}
    assert {_hf_name_of_vllm(n) for n in loaded} == set(hf)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, hf[_hf_name_of_vllm(name)]), name


def test_sharded_hf_exports_record_their_making_in_the_index(tiny_dir: Path, tmp_path: Path) -> None:
    convert(tiny_dir / "voxtral-hf", tmp_path / "c", "hf", progress=False, shard_bytes=1 << 20)
    meta = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())["metadata"]
    assert meta["tool"] == "convert" and meta["input_format"] == "hf" and meta["total_size"] > 1 << 20
    job = MergeJob(
        devstral=tiny_dir / "devstral-hf",
        voxtral=tiny_dir / "voxtral-hf",
        output=tmp_path / "m",
        params=MergeParams(method="linear", alpha=0.1),
        rope_from="devstral",
        shard_bytes=1 << 20,
        progress=False,
    )
    run_merge(job)
    meta = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["metadata"]
    assert meta["tool"] == "merge" and meta["method"] == "linear" and meta["params"]["alpha"] == 0.1
    assert set(meta["parents_content_sha256"]) == {"devstral", "voxtral"} and meta["total_size"] > 1 << 20
    assert (tmp_path / "m" / "preprocessor_config.json").is_file()  # the merge keeps Voxtral's audio section
