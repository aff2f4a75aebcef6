"""SFT data side: chat encoding and loss mask, sources (JSONL, Energon), mixture ratios/budgets/resume, packing."""

from __future__ import annotations

import base64
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

from megatron_ext.data.chat import ChatEncoder, SampleError, load_tokenizer
from megatron_ext.data.loader import PAD_ID
from megatron_ext.data.mixture import Mixture
from megatron_ext.data.packing import Packer, collate, document_causal_mask
from megatron_ext.data.sources import DataSourceError, EnergonSource, JsonlSource
from megatron_ext.testing.tiny_chats import text_chat, write_tiny_chats


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_chats(tmp_path_factory.mktemp("chats"), n_text=60, n_audio=20)


@pytest.fixture(scope="module")
def encoder(tiny_dir: Path) -> ChatEncoder:
    return ChatEncoder(load_tokenizer(tiny_dir / "voxtral-hf"), tokens_per_chunk=375, audio_token_id=24)


def _decode(enc: ChatEncoder, tokens: np.ndarray) -> str:
    return enc.tokenizer.decode(tokens.tolist(), special_token_policy=SpecialTokenPolicy.KEEP)


def test_loss_mask_covers_exactly_the_assistant_turns(encoder: ChatEncoder) -> None:
    import random

    sample = text_chat(random.Random(3), 7)
    doc = encoder.encode(sample)
    supervised = _decode(encoder, doc.tokens[doc.loss_mask])
    final = sample["messages"][3]["content"]
    assert supervised.startswith("[TOOL_CALLS]") and supervised.endswith(final + "</s>")
    assert sample["messages"][0]["content"] not in supervised  # user turn is not trained on
    assert sample["messages"][2]["content"] not in supervised.replace(final, "")  # nor the tool result
    # the mask is two contiguous spans (tool call, final answer), each ending with </s>
    edges = np.flatnonzero(np.diff(np.r_[0, doc.loss_mask.astype(int), 0]))
    assert len(edges) == 4 and doc.tokens[doc.loss_mask][-1] == 2


def test_openai_tool_call_ids_become_tekken_ids(encoder: ChatEncoder) -> None:
    import random

    sample = text_chat(random.Random(0), 42)
    assert sample["messages"][1]["tool_calls"][0]["id"] == "call_0042"  # rejected by Tekken as it is
    text = _decode(encoder, encoder.encode(sample).tokens)
    mapped = re.findall(r'"id": "([a-zA-Z0-9]{9})"', text)
    assert len(mapped) == 1 and text.count(mapped[0]) == 2  # the call and its tool result share the new id


def test_audio_turn_becomes_audio_tokens_and_16k_chunks(encoder: ChatEncoder, chats: dict[str, Path]) -> None:
    doc = encoder.encode(JsonlSource(chats["audio"])[0])
    assert len(doc.audio_chunks) == 1 and doc.audio_chunks[0].shape == (480000,)  # 30 s at 16 kHz
    assert int((doc.tokens == 24).sum()) == 375
    assert not doc.loss_mask[doc.tokens == 24].any()
    assert _decode(encoder, doc.tokens[doc.loss_mask]).startswith("You said:")
    assert np.abs(doc.audio_chunks[0][:16000]).max() > 0.01  # real speech, not silence


def test_system_prompt_next_to_audio_is_folded_or_refused(tiny_dir: Path, chats: dict[str, Path]) -> None:
    sample = JsonlSource(chats["audio"])[0]
    sample["messages"].insert(0, {"role": "system", "content": "You are a coding agent."})
    tok = load_tokenizer(tiny_dir / "voxtral-hf")
    doc = ChatEncoder(tok, 375, 24, "merge").encode(sample)
    assert "You are a coding agent." in _decode(ChatEncoder(tok, 375, 24), doc.tokens)
    with pytest.raises(SampleError, match="system prompt next to audio"):
        ChatEncoder(tok, 375, 24, "error").encode(sample, where="x.jsonl: sample 0")


def test_bad_sample_error_names_the_sample(encoder: ChatEncoder) -> None:
    with pytest.raises(SampleError, match=r"^data.jsonl: sample 4: cannot encode chat"):
        encoder.encode(
            {"messages": [{"role": "assistant", "content": "hi"}, {"role": "bogus"}]}, where="data.jsonl: sample 4"
        )
    with pytest.raises(SampleError, match="last role Assistant"):  # nothing to train on
        encoder.encode({"messages": [{"role": "user", "content": "hi"}]}, where="s")


def test_jsonl_source_errors_name_file(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "x"}]}\n{"oops": 1}\n')
    src = JsonlSource(p)
    assert len(src) == 2
    with pytest.raises(DataSourceError, match=r"d.jsonl: sample 1: expected an object"):
        src[1]
    with pytest.raises(DataSourceError, match="not found"):
        JsonlSource(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("text,audio", [(100, 0), (95, 5), (90, 10), (80, 20), (67, 33)])
def test_mixture_ratio_within_two_points_over_1000_documents(text: int, audio: int) -> None:
    sources = [_Fake("text", 5000), _Fake("audio", 3000)]
    mix = Mixture(sources, [text, audio], [None, None], seed=1, shuffle_buffer=16)
    picks = np.array([next(mix).source for _ in range(1000)])
    share = 100 * (picks == 1).mean()
    assert abs(share - audio) <= 2.0, share


def test_epoch_budget_limits_a_source_and_reshuffles_unlimited_ones() -> None:
    mix = Mixture([_Fake("text", 50), _Fake("audio", 40)], [50, 50], [None, 0.25], seed=0)
    refs = [next(mix) for _ in range(200)]
    audio = [r.index for r in refs if r.source == 1]
    assert len(audio) == 10 and len(set(audio)) == 10  # a quarter of 40, no repeats
    text = [r.index for r in refs if r.source == 0]
    assert sorted(text[:50]) == list(range(50)) and text[:50] != text[50:100]  # full epoch, then new order
    finite = Mixture([_Fake("a", 3)], [1], [1.0], seed=0)
    assert len(list(finite)) == 3


def test_mixture_and_packer_resume_exactly(encoder: ChatEncoder, chats: dict[str, Path]) -> None:
    def packer() -> Packer:
        srcs = [JsonlSource(chats["text"], "text"), JsonlSource(chats["audio"], "audio")]
        return Packer(Mixture(srcs, [80, 20], [None, 0.5], seed=5, shuffle_buffer=8), encoder, 700, PAD_ID)

    a = packer()
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # the state is plain JSON
    expected = [next(a) for _ in range(4)]
    b = packer()
    b.load_state_dict(state)
    for want, got in zip(expected, [next(b) for _ in range(4)], strict=True):
        assert np.array_equal(want.tokens, got.tokens) and want.doc_lens == got.doc_lens


def test_packing_positions_labels_and_padding(encoder: ChatEncoder, chats: dict[str, Path]) -> None:
    srcs = [JsonlSource(chats["text"], "text"), JsonlSource(chats["audio"], "audio")]
    packer = Packer(Mixture(srcs, [50, 50], [None, None], seed=2), encoder, 1024, PAD_ID)
    seqs = [next(packer) for _ in range(4)]
    for seq in seqs:
        assert sum(seq.doc_lens) == 1024 and len(seq.doc_lens) >= 2
        start = 0
        for n in seq.doc_lens[:-1] if seq.source_ids[-1] == -1 else seq.doc_lens:
            assert np.array_equal(seq.position_ids[start : start + n], np.arange(n))
            assert seq.tokens[start] == 1  # each document starts with <s>
            assert seq.labels[start + n - 1] == 2  # and its last label is its own </s>
            start += n
        assert not seq.loss_mask[seq.source_ids == -1].any()
        assert (seq.tokens == 24).sum() == 375 * len(seq.audio_chunks)
    batch = collate(seqs[:2], mel=None)
    assert batch["cu_seqlens"][-1] == 2048 and batch["tokens"].shape == (2, 1024)
    mask = document_causal_mask(batch["doc_ids"])
    n0 = seqs[0].doc_lens[0]
    assert not mask[0, 0, n0 - 1, :n0].any() and mask[0, 0, n0, :n0].all()  # no attention across documents


def test_overlong_documents_truncate_or_drop(encoder: ChatEncoder, chats: dict[str, Path]) -> None:
    srcs = [JsonlSource(chats["text"], "text")]
    trunc = Packer(Mixture(srcs, [1], [None], seed=0), encoder, 200, PAD_ID, "truncate")
    assert next(trunc).doc_lens == [200]
    hopeless = Packer(Mixture(srcs, [1], [None], seed=0), encoder, 100, PAD_ID, "truncate")
    with pytest.raises(ValueError, match="do not fit seq_length=100"):  # no assistant token in 100 tokens
        next(hopeless)
    audio = [JsonlSource(chats["audio"], "audio")]
    drop = Packer(Mixture(audio, [1], [1.0], seed=0), encoder, 300, PAD_ID, "truncate")
    with pytest.raises(StopIteration):  # every audio chat would lose [AUDIO] tokens: all dropped
        next(drop)
    assert drop.dropped == 20


def test_energon_webdataset_source(tmp_path: Path, chats: dict[str, Path]) -> None:
    from megatron_ext.data.synth.webdataset import energon_prepare

    samples = [json.loads(line) for line in chats["audio"].read_text().splitlines()[:3]]
    wds = tmp_path / "wds"
    wds.mkdir()
    with tarfile.open(wds / "shard-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, sample in enumerate(samples):
            part = sample["messages"][0]["content"][0]["input_audio"]
            wav = base64.b64decode(part["data"])
            part["data"] = "audio_0.wav"
            for name, data in ((f"s{i:04d}.json", json.dumps(sample).encode()), (f"s{i:04d}.audio_0.wav", wav)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    energon_prepare(wds)
    src = EnergonSource(wds)
    assert len(src) == 3
    audio_b64 = lambda sample: sample["messages"][0]["content"][0]["input_audio"]["data"]  # noqa: E731
    assert audio_b64(src[1]) == audio_b64(json.loads(chats["audio"].read_text().splitlines()[1]))
    with pytest.raises(DataSourceError, match="not an Energon dataset"):
        EnergonSource(tmp_path)


class _Fake:
    """Index-only source for mixture tests."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"messages": [], "i": i}

    def where(self, i: int) -> str:
        return f"{self.name}:{i}"
