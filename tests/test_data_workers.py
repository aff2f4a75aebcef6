"""SFT data loading off the training loop: per-sequence streams, worker processes with prefetch, exact resume.

Real tiny tokenizer, real speech clips (log-mel computed in the workers), real forked worker processes.
Batches are compared byte for byte (every tensor's bytes, every other field by value).
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from megatron_ext.audio.features import log_mel_chunks
from megatron_ext.data.chat import ChatEncoder, load_tokenizer
from megatron_ext.data.loader import SFTData
from megatron_ext.data.sources import DataSourceError
from megatron_ext.testing.tiny_chats import write_tiny_chats
from megatron_ext.training.config import DataSection, SourceSection, TrainConfigError, load_config

STREAMS = 4  # sequences per step (training.global_batch_size)


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_chats(tmp_path_factory.mktemp("chats"), n_text=40, n_audio=12)


@pytest.fixture(scope="module")
def encoder(tiny_dir: Path) -> ChatEncoder:
    return ChatEncoder(load_tokenizer(tiny_dir / "voxtral-hf"), tokens_per_chunk=375, audio_token_id=24)


def _mel(wave) -> torch.Tensor:
    return log_mel_chunks(wave)[0]


def _data(chats: dict[str, Path], encoder: ChatEncoder, workers: int, dp_rank: int = 0, dp_size: int = 1) -> SFTData:
    cfg = DataSection(
        sources=[
            SourceSection(name="text", path=str(chats["text"]), ratio=70),
            SourceSection(name="audio", path=str(chats["audio"]), ratio=30, modality="audio"),
        ],
        shuffle_buffer=8,
        num_workers=workers,
        prefetch=3,  # fewer documents ahead than a sequence holds: refills while packing, pending work at saves
    )
    return SFTData(cfg, 400, 7, encoder, _mel, dp_rank, dp_size, num_streams=STREAMS)


def _steps(data: SFTData, n: int) -> list[list[dict[str, Any]]]:
    rows = len(data.streams)
    return [data.step_batches(rows, 1) for _ in range(n)]


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if torch.is_tensor(x) or torch.is_tensor(y):
            if not (torch.is_tensor(x) and torch.is_tensor(y)) or x.dtype != y.dtype or x.shape != y.shape:
                return False
            if x.numpy().tobytes() != y.numpy().tobytes():
                return False
        elif x != y:
            return False
    return True


def _assert_same_steps(want: list[list[dict[str, Any]]], got: list[list[dict[str, Any]]]) -> None:
    assert len(want) == len(got)
    for step, (w, g) in enumerate(zip(want, got, strict=True)):
        assert len(w) == len(g) and all(_same(a, b) for a, b in zip(w, g, strict=True)), f"step {step} differs"


@pytest.fixture(scope="module")
def uninterrupted(chats: dict[str, Path], encoder: ChatEncoder) -> list[list[dict[str, Any]]]:
    """Five steps of the in-process loader (num_workers=0), never interrupted."""
    data = _data(chats, encoder, 0)
    steps = _steps(data, 5)
    assert sum(b["num_audio_chunks"] for s in steps for b in s) > 0 and any(b["mel"] is not None for b in steps[0])
    return steps


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_fresh_loader_gives_the_uninterrupted_batches(chats, encoder, uninterrupted, workers) -> None:
    """Consume 2 steps, save the position (as JSON), restore it in a fresh loader: the next 3 steps equal the
    uninterrupted in-process loader's byte for byte, mel features included; the same with 2 workers."""
    first = _data(chats, encoder, workers)
    _assert_same_steps(uninterrupted[:2], _steps(first, 2))
    state = json.loads(json.dumps(first.state_dict()))  # the position is plain JSON
    first.close()
    fresh = _data(chats, encoder, workers)
    fresh.load_state_dict(state)
    _assert_same_steps(uninterrupted[2:], _steps(fresh, 3))
    fresh.close()


def test_a_position_saved_with_workers_resumes_without_and_back(chats, encoder, uninterrupted) -> None:
    two = _data(chats, encoder, 2)
    _steps(two, 2)
    state = two.state_dict()
    two.close()
    zero = _data(chats, encoder, 0)
    zero.load_state_dict(state)
    _assert_same_steps(uninterrupted[2:4], _steps(zero, 2))
    again = _data(chats, encoder, 2)
    again.load_state_dict(zero.state_dict())
    _assert_same_steps(uninterrupted[4:], _steps(again, 1))
    again.close()


def test_each_rank_encodes_only_its_sequences_and_any_dp_size_resumes(chats, encoder, uninterrupted, monkeypatch):
    """Two DP ranks: rank r gets sequences r and r + 2 of each step (together one rank's global batch), encodes
    only documents of its own streams (sample index = stream mod 4), and their merged position resumes on one
    rank exactly."""
    encoded: list[str] = []
    real = ChatEncoder.encode

    def counting(self, sample, source="", where="sample"):
        encoded.append(where)
        return real(self, sample, source, where)

    monkeypatch.setattr(ChatEncoder, "encode", counting)
    ranks, per_rank, seen = [], [], []
    for r in (0, 1):
        ranks.append(_data(chats, encoder, 0, r, 2))
        per_rank.append(_steps(ranks[-1], 2))
        seen.append(list(encoded))
        encoded.clear()
        assert {int(w.rsplit(" ", 1)[1]) % STREAMS for w in seen[-1]} == {r, r + 2}
    for step in range(2):
        merged = [per_rank[j % 2][step][j // 2] for j in range(STREAMS)]
        _assert_same_steps([uninterrupted[step]], [merged])
    _steps(_data(chats, encoder, 0), 2)
    assert sorted(seen[0] + seen[1]) == sorted(encoded)  # no document encoded twice across the ranks
    states = [d.state_dict() for d in ranks]  # no process group here: each rank reports its own streams
    assert [s is None for s in states[0]["streams"]] == [False, True, False, True]
    merged_state = {"num_streams": STREAMS, "streams": [states[j % 2]["streams"][j] for j in range(STREAMS)]}
    single = _data(chats, encoder, 0)
    single.load_state_dict(merged_state)
    _assert_same_steps(uninterrupted[2:], _steps(single, 3))


def test_worker_errors_name_the_sample_and_bad_positions_are_refused(chats, encoder, tmp_path: Path) -> None:
    bad = tmp_path / "text.jsonl"
    lines = chats["text"].read_text().splitlines()
    lines[1::STREAMS] = ["{not json"] * len(lines[1::STREAMS])  # all of stream 1's share of the text
    bad.write_text("\n".join(lines) + "\n")
    data = _data({**chats, "text": bad}, encoder, 2)
    with pytest.raises(DataSourceError, match=rf"^{bad}: sample \d*[13579]: malformed JSON"):
        _steps(data, 3)
    data.close()
    data = _data(chats, encoder, 0)
    with pytest.raises(DataSourceError, match="single-stream loader"):
        data.load_state_dict({"mixture": {}, "carry": None, "dropped": 0})
    with pytest.raises(DataSourceError, match="8 sequences per step, this run has 4"):
        data.load_state_dict({"num_streams": 8, "streams": [None] * 8})
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(DataSourceError, match="largest source has 3 samples, fewer than the 4 sequences"):
        _data({"text": small, "audio": small}, encoder, 0)


def test_a_killed_worker_stops_the_loader_instead_of_hanging(chats, encoder) -> None:
    before = {c.pid for c in psutil.Process().children()}
    data = _data(chats, encoder, 2)
    _steps(data, 1)
    workers = [c for c in psutil.Process().children() if c.pid not in before]
    assert len(workers) == 2
    workers[0].send_signal(signal.SIGUSR1)  # SLURM's save signal reaching the whole process group: ignored
    _steps(data, 1)
    workers[0].kill()
    # The pool learns of the death on its manager thread; until then the surviving worker may serve a few steps
    # (seen: 3 steps in 1 s), so wait for the pool to know, at most 10 s, before asking for more.
    deadline = time.monotonic() + 10
    while not data.pool._broken and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(BrokenProcessPool):
        _steps(data, 3)
    data.close()


def test_worker_settings_are_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {checkpoint: x}\ndata: {sources: [{name: a, path: p}]}\n")
    assert load_config(cfg).data.num_workers == 0
    with pytest.raises(TrainConfigError, match=r"^data.num_workers: must be >= 0, got -1"):
        load_config(cfg, ["data.num_workers=-1"])
    with pytest.raises(TrainConfigError, match=r"^data.prefetch: must be >= 1, got 0"):
        load_config(cfg, ["data.prefetch=0"])
