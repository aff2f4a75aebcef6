"""The miniature's parents without training them: tokenizers, sample kinds, short audio chunks, tool-call parsing,
and the cache (key and reuse). The training itself is in the slow test (test_miniature_slow.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from megatron_ext.audio.features import log_mel_chunks
from megatron_ext.audio.tts import EspeakTTS
from megatron_ext.audio.waveform import encode_wav
from megatron_ext.config import ConfigError, EncoderConfig
from megatron_ext.data.chat import ChatEncoder, load_tokenizer
from megatron_ext.miniature.data import speak_all
from megatron_ext.miniature.parents import MANIFEST, MiniatureConfig, Stage, build_parents, cache_key, cached
from megatron_ext.miniature.scoring import parsed_call
from megatron_ext.miniature.tasks import tool_call_chat, tool_call_tasks
from megatron_ext.miniature.tokenizer import miniature_tekkens, train_bpe
from megatron_ext.tokenizer.tekken_builder import write_tekken

CFG = MiniatureConfig()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mini-tok")
    paths = {}
    for tag, data in miniature_tekkens(CFG.seed, CFG.vocab_size, CFG.chunk_seconds).items():
        paths[tag] = root / tag / "tekken.json"
        paths[tag].parent.mkdir()
        write_tekken(data, paths[tag])
    return paths


def test_bpe_is_deterministic_and_learns_the_corpus_words() -> None:
    texts = ["read the parser", "run the parser tests", "the parser"] * 3
    vocab = train_bpe(texts, 12)
    assert vocab == train_bpe(texts, 12) and len(vocab) == 256 + 12
    assert b" parser" in vocab  # the most frequent word became one token
    with pytest.raises(ValueError, match="merges"):
        train_bpe(["ab"], 5)


def test_parent_tokenizers_share_words_and_differ_in_specials(tokenizers: dict[str, Path]) -> None:
    vox, dev = (json.loads(tokenizers[t].read_text()) for t in ("voxtral", "devstral"))
    assert vox["vocab"] == dev["vocab"]
    names = {t: {s["rank"]: s["token_str"] for s in d["special_tokens"]} for t, d in (("vox", vox), ("dev", dev))}
    assert (names["vox"][24], names["vox"][34], names["dev"][32]) == ("[AUDIO]", "[TRANSCRIBE]", "[ARGS]")
    assert names["dev"][24] == "<SPECIAL_24>" and names["vox"][32] == "<SPECIAL_32>"
    assert vox["audio"]["chunk_length_s"] == 4.0 and "audio" not in dev
    tok = load_tokenizer(tokenizers["devstral"]).instruct_tokenizer.tokenizer
    for word in (" parser", " garden", " socket"):
        assert len(tok.encode(word, bos=False, eos=False)) == 1, word  # corpus words are single tokens


def test_plain_document_is_supervised_on_every_token(tokenizers: dict[str, Path]) -> None:
    doc = ChatEncoder(load_tokenizer(tokenizers["devstral"]), None, None).encode({"text": "def load_user(path):"})
    assert doc.tokens[0] == 1 and doc.tokens[-1] == 2 and doc.loss_mask.all()


def test_transcription_sample_in_short_chunks(tokenizers: dict[str, Path]) -> None:
    import base64

    wav = base64.b64encode(encode_wav(EspeakTTS().synthesize("The cat sees a red ball.", None))).decode()
    sample = {"transcription": {"input_audio": {"data": wav, "format": "wav"}, "language": "en", "text": "The cat."}}
    per_chunk = CFG.chunk_frames // 2 // 4  # encoder positions / projector stack
    enc = ChatEncoder(load_tokenizer(tokenizers["voxtral"]), per_chunk, 24)
    doc = enc.encode(sample)
    tok = enc.instruct.tokenizer
    assert tok.decode([int(t) for t in doc.tokens[doc.loss_mask]]) == "The cat."
    assert doc.tokens[doc.loss_mask][-1] == 2  # </s> is supervised
    assert int((doc.tokens == 24).sum()) == per_chunk * len(doc.audio_chunks) == per_chunk  # one 4 s chunk
    mel = log_mel_chunks(doc.audio_chunks[0], CFG.chunk_frames)
    assert mel.shape == (1, 128, CFG.chunk_frames)
    with pytest.raises(Exception, match="transcription"):
        enc.encode({"transcription": {"language": "en", "text": "x"}}, where="s.jsonl: sample 3")


def test_short_chunks_match_the_30s_front_end() -> None:
    wave = np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32) * 0.1
    short, whole = log_mel_chunks(wave, 400), log_mel_chunks(wave)
    assert short.shape == (1, 128, 400) and whole.shape == (1, 128, 3000)
    # Same STFT and mel bank: frames away from the padding agree up to the per-clip max clamp (tolerance 1e-5).
    clamp = lambda x: torch.clamp(x, min=x.max() - 2.0)  # noqa: E731
    torch.testing.assert_close(clamp(short[0, :, :250]), clamp(whole[0, :, :250]), atol=1e-5, rtol=0)


def test_whisper_width_keeps_30s_chunks() -> None:
    with pytest.raises(ConfigError, match="max_source_positions=200"):
        EncoderConfig(
            num_layers=32, hidden_size=1280, ffn_hidden_size=5120, num_attention_heads=20, max_source_positions=200
        )
    assert (
        EncoderConfig(
            num_layers=2, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4, max_source_positions=200
        ).mel_frames
        == 400
    )


@pytest.mark.parametrize("tag", ["devstral", "voxtral"])
def test_tool_call_read_back_from_each_format(tokenizers: dict[str, Path], tag: str) -> None:
    record = tool_call_tasks(n_train=1).heldout[3]
    chat = tool_call_chat(record, call_id="a1b2c3d4e")
    mistral = load_tokenizer(tokenizers[tag])
    request = ChatCompletionRequest.from_openai(chat["messages"], tools=chat["tools"])
    tokens = mistral.encode_chat_completion(request).tokens
    answer = tokens[tokens.index(4) + 1 :]  # after [/INST]: the assistant's tool call, as a model would emit it
    assert parsed_call(mistral, answer) == record["answer"]
    assert parsed_call(mistral, answer[:-3]) is None  # cut-off JSON is no call
    assert parsed_call(mistral, mistral.instruct_tokenizer.tokenizer.encode("Done.", bos=False, eos=True)) is None


def test_cache_key_follows_the_config() -> None:
    assert cache_key(CFG) == cache_key(MiniatureConfig())
    assert cache_key(dataclasses.replace(CFG, seed=1)) != cache_key(CFG)
    assert cache_key(dataclasses.replace(CFG, devstral=Stage(1, 1e-3, 64, 1))) != cache_key(CFG)


def test_rerun_with_the_same_key_reuses_the_output(tmp_path: Path) -> None:
    out = tmp_path / "parents"
    for name in ("voxtral-mini-hf", "devstral-mini-hf"):
        (out / name).mkdir(parents=True)
        (out / name / "config.json").write_text("{}")
    (out / MANIFEST).write_text(json.dumps({"key": cache_key(CFG), "scores": {}}))
    said = []
    assert build_parents(out, CFG, log=said.append)["key"] == cache_key(CFG)  # returned without training
    assert said and "reusing" in said[0]
    assert cached(out, cache_key(dataclasses.replace(CFG, seed=5))) is None
    (out / "devstral-mini-hf" / "config.json").unlink()
    assert cached(out, cache_key(CFG)) is None  # an incomplete output is not reused


def test_speech_does_not_depend_on_the_number_of_tts_workers() -> None:
    texts = ["Delete lib/cache.py.", "The cat sees a red ball.", "What is two plus three?"]
    voices = ("espeak:en-us", "espeak:en-us+m3")
    one, two = speak_all(texts, voices, workers=1), speak_all(texts, voices, workers=2)
    assert one == two and len(set(one)) == 3
    assert speak_all(texts[:1], voices[1:], workers=1) != one[:1]  # the second voice really is another voice
