"""Megatron AudioLanguageModel vs HF transformers on the tiny parents: fp32, CPU, max-abs 1e-5 on logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from megatron_ext.audio.features import audio_tokens_per_chunk, log_mel_chunks
from megatron_ext.audio.waveform import load_audio
from megatron_ext.checkpoint import mapping
from megatron_ext.compat.cpu import destroy_distributed, init_distributed
from megatron_ext.config import ConfigError, ModelConfig
from megatron_ext.models.audio_lm import AudioLanguageModel, AudioTokenMismatch
from megatron_ext.models.build import BuildConfig, FP8Config, build_model
from megatron_ext.models.loading import load_checkpoint, load_full_tensors
from megatron_ext.models.tokens import audio_token_id, check_audio_token
from megatron_ext.testing.tiny_models import DEVSTRAL, DEVSTRAL2, VOXTRAL

TOL = 1e-5  # fp32 max-abs on logits / encoder states
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0930.wav")
PER_CHUNK = audio_tokens_per_chunk()  # 375
AUDIO, BEGIN_AUDIO, INST, END_INST = 24, 25, 3, 4


@pytest.fixture(scope="module", autouse=True)
def dist() -> None:
    init_distributed(tp=1, pp=1)
    yield
    destroy_distributed()


def _dequantized(path: Path) -> dict[str, torch.Tensor]:
    """The published Mistral3 FP8 shards read by hand: text tensors under CausalLM names, fp8 x weight_scale_inv."""
    raw: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        raw |= load_file(str(shard))
    out = {}
    for name, t in raw.items():
        if not name.startswith("language_model.") or name.endswith(("weight_scale_inv", "activation_scale")):
            continue  # vision tower and projector, scales
        scale = raw.get(name.removesuffix("weight") + "weight_scale_inv")
        out[name.removeprefix("language_model.")] = t.float() * scale if scale is not None else t
    return out


def _megatron(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> AudioLanguageModel:
    model = build_model(cfg, BuildConfig(init_weights=False))
    load_full_tensors(model, dict(mapping.hf_to_megatron(cfg, hf.__getitem__)).__getitem__)
    return model.eval()


@pytest.fixture(scope="module")
def voxtral(tiny_dir: Path):
    hf = transformers.VoxtralForConditionalGeneration.from_pretrained(tiny_dir / "voxtral-hf", dtype=torch.float32)
    return _megatron(VOXTRAL, load_file(str(tiny_dir / "voxtral-hf" / "model.safetensors"))), hf.eval()


def _text_ids(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(1000, 2048, (batch, n), generator=torch.Generator().manual_seed(seed))


def _audio_prompt(chunks_per_clip: list[int]) -> torch.Tensor:
    ids = [1, INST]
    for chunks in chunks_per_clip:
        ids += [BEGIN_AUDIO] + [AUDIO] * (PER_CHUNK * chunks)
    return torch.tensor([ids + [END_INST, 1100, 1500, 1999]])


@torch.no_grad()
def _max_diff(model: AudioLanguageModel, hf, ids: torch.Tensor, features: torch.Tensor | None = None) -> float:
    ours = model(ids, torch.arange(ids.shape[1]).expand_as(ids), audio_features=features)
    ref = hf(input_ids=ids, input_features=features).logits if features is not None else hf(input_ids=ids).logits
    assert ours.shape == ref.shape
    return (ours - ref).abs().max().item()


def test_voxtral_text_only(voxtral) -> None:
    assert _max_diff(*voxtral, _text_ids(24, 0, batch=2)) < TOL


def test_voxtral_one_clip(voxtral) -> None:
    features = log_mel_chunks(load_audio(LIBRIVOX))
    assert features.shape == (1, 128, 3000)
    assert _max_diff(*voxtral, _audio_prompt([1]), features) < TOL


def test_voxtral_two_clips(voxtral) -> None:
    speech = load_audio(LIBRIVOX)
    features = torch.cat([log_mel_chunks(speech), log_mel_chunks(speech.flip(0))])
    assert _max_diff(*voxtral, _audio_prompt([1, 1]), features) < TOL


def test_voxtral_clips_in_a_batch_follow_row_order(voxtral) -> None:
    speech = load_audio(LIBRIVOX)
    features = torch.cat([log_mel_chunks(speech), log_mel_chunks(-speech)])
    ids = torch.cat([_audio_prompt([1]), _audio_prompt([1])])
    ids[1, -1] = 1234
    assert _max_diff(*voxtral, ids, features) < TOL


def test_voxtral_31s_clip_is_two_chunks(voxtral) -> None:
    speech = load_audio(LIBRIVOX)
    clip = speech.repeat(31 * 16000 // speech.numel() + 1)[: 31 * 16000]
    features = log_mel_chunks(clip)
    assert features.shape == (2, 128, 3000)
    assert _max_diff(*voxtral, _audio_prompt([2]), features) < TOL


@torch.no_grad()
def test_encoder_alone_matches_hf(voxtral) -> None:
    model, hf = voxtral
    features = torch.randn(2, 128, 3000, generator=torch.Generator().manual_seed(3))
    ours = model.audio_encoder(features).transpose(0, 1)  # [1500, chunks, d] -> [chunks, 1500, d]
    ref = hf.model.audio_tower(features).last_hidden_state
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < TOL


def test_devstral_text(tiny_dir: Path) -> None:
    hf = transformers.MistralForCausalLM.from_pretrained(tiny_dir / "devstral-hf", dtype=torch.float32).eval()
    model = _megatron(DEVSTRAL, load_file(str(tiny_dir / "devstral-hf" / "model.safetensors")))
    assert _max_diff(model, hf, _text_ids(40, 1, batch=2)) < TOL


@pytest.fixture(scope="module")
def devstral2(tiny_dir: Path):
    """Devstral-2 (YaRN factor 48 over 32 positions, llama-4 scaling): the published Mistral3 FP8 layout read by
    transformers itself vs Megatron holding the hand-dequantised text weights."""
    weights = _dequantized(tiny_dir / "devstral2-hf")
    hf = transformers.Mistral3ForConditionalGeneration.from_pretrained(tiny_dir / "devstral2-hf", dtype=torch.float32)
    return _megatron(DEVSTRAL2, weights), hf.eval()


def test_devstral2_yarn_and_query_scaling_past_original_context(devstral2) -> None:
    model, hf = devstral2
    ids = _text_ids(100, 2, batch=2)  # > original_max_position_embeddings (32): YaRN and llama-4 scale active
    assert DEVSTRAL2.decoder.rope.original_max_position_embeddings < ids.shape[1]
    assert _max_diff(model, hf, ids) < TOL
    # The query scaling is really exercised: without it the logits move well past the tolerance.
    beta = model.config.llama4_scaling_beta
    model.config.llama4_scaling_beta = None
    try:
        assert _max_diff(model, hf, ids) > 100 * TOL
    finally:
        model.config.llama4_scaling_beta = beta


@torch.no_grad()
def test_devstral2_packed_rows_use_true_positions(devstral2) -> None:
    """Two samples packed in one row (positions restart, block-causal mask) == each sample alone."""
    model, _ = devstral2
    a, b = _text_ids(40, 4), _text_ids(60, 5)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(40), torch.arange(60)])[None]
    seg = torch.cat([torch.zeros(40), torch.ones(60)])
    causal = torch.ones(100, 100).tril().bool()
    mask = ~(causal & (seg[:, None] == seg[None, :]))[None, None]  # True = masked (Megatron convention)
    out = model(packed, positions, attention_mask=mask)
    alone_a, alone_b = model(a, torch.arange(40)[None]), model(b, torch.arange(60)[None])
    assert (out[:, :40] - alone_a).abs().max().item() < TOL
    assert (out[:, 40:] - alone_b).abs().max().item() < TOL


def test_audio_token_count_mismatch_is_an_error(voxtral) -> None:
    model, _ = voxtral
    features = torch.zeros(1, 128, 3000)
    ids = _audio_prompt([1])
    ids[0, 10] = 1500  # one [AUDIO] token fewer than the chunk's 375 embeddings
    with pytest.raises(AudioTokenMismatch, match=r"374 \[AUDIO\] tokens \(id 24\) .* 375 audio embeddings"):
        model(ids, audio_features=features)
    with pytest.raises(AudioTokenMismatch, match=r"375 \[AUDIO\] tokens .* but 0 audio embeddings"):
        model(_audio_prompt([1]))


def test_audio_token_id_comes_from_the_tokenizer(tiny_dir: Path) -> None:
    assert audio_token_id(tiny_dir / "voxtral-hf" / "tekken.json") == VOXTRAL.audio_token_id
    with pytest.raises(ConfigError, match="no \\[AUDIO\\]"):
        audio_token_id(tiny_dir / "devstral-hf" / "tekken.json")
    wrong = dataclasses.replace(VOXTRAL, audio_token_id=25)
    with pytest.raises(ConfigError, match="audio_token_id=25 in the config but \\[AUDIO\\] is 24"):
        check_audio_token(wrong, tiny_dir / "voxtral-hf" / "tekken.json")


def test_freeze_flags(tiny_dir: Path) -> None:
    hf = load_file(str(tiny_dir / "voxtral-hf" / "model.safetensors"))
    full = mapping.megatron_getter(VOXTRAL, hf.__getitem__)
    features = torch.randn(1, 128, 3000, generator=torch.Generator().manual_seed(1))
    ids = _audio_prompt([1])
    for freeze_encoder, freeze_projector in ((True, False), (False, True)):
        model = build_model(
            VOXTRAL, BuildConfig(init_weights=False, freeze_encoder=freeze_encoder, freeze_projector=freeze_projector)
        )
        load_full_tensors(model, full)
        model(ids, labels=torch.roll(ids, -1, 1), audio_features=features).mean().backward()
        encoder_grads = [p.grad for p in model.audio_encoder.parameters()]
        projector_grads = [p.grad for p in model.audio_projector.parameters()]
        assert all(g is None for g in encoder_grads) == freeze_encoder
        assert all(g is None for g in projector_grads) == freeze_projector
        assert all(
            g is not None and g.abs().sum() > 0 for g in (encoder_grads if not freeze_encoder else projector_grads)
        )


def test_fp8_request_on_the_local_spec_is_reported_off(caplog: pytest.LogCaptureFixture) -> None:
    model = build_model(DEVSTRAL, BuildConfig(backend="local", fp8=FP8Config()))
    assert model.config.fp8 is None
    assert "FP8 is off" in caplog.text


def test_full_recompute_keeps_query_scaling(tiny_dir: Path) -> None:
    """Activation recompute re-runs attention in backward: the llama-4 scale must travel with the rope argument."""
    weights = mapping.megatron_getter(DEVSTRAL2, _dequantized(tiny_dir / "devstral2-hf").__getitem__)
    ids = _text_ids(80, 6)
    results = []
    for recompute in (None, "full"):
        model = build_model(DEVSTRAL2, BuildConfig(init_weights=False, recompute_granularity=recompute))
        load_full_tensors(model, weights)
        model.train()
        loss = model(ids, torch.arange(80)[None], labels=torch.roll(ids, -1, 1)).mean()
        loss.backward()
        results.append((loss.detach(), model.language_model.decoder.layers[0].self_attention.linear_qkv.weight.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert torch.equal(loss_a, loss_b)
    assert (grad_a - grad_b).abs().max().item() < TOL


def test_load_checkpoint_from_torch_dist_hf_and_native_agree(tiny_dir: Path, tmp_path: Path) -> None:
    from megatron_ext.checkpoint.convert import convert

    convert(tiny_dir / "voxtral-hf", tmp_path / "td", "megatron", progress=False)
    states = []
    for source in (tmp_path / "td", tiny_dir / "voxtral-hf", tiny_dir / "voxtral-native"):
        model = build_model(VOXTRAL, BuildConfig(init_weights=False))
        assert load_checkpoint(model, source) == VOXTRAL
        states.append({k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)})
    for other in states[1:]:
        assert states[0].keys() == other.keys()
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])
