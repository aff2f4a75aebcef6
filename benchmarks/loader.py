"""Throughput of the SFT data loader for one training process: packed tokens/s for text and for audio samples
(chat template, audio decode, log-mel, packing), in-process (the baseline) and with worker processes.

Text samples are the bundled coding-agent chats; audio samples are real LibriVox recordings (Debian
`pocketsphinx-testdata`) as spoken user turns, each padded to one 30 s chunk = 375 [AUDIO] tokens, as
Voxtral encodes them. Tokenizer: the tiny Tekken of the test models. The rate needed is that of one
data-parallel rank in the paper's run (every TP peer of a rank runs its own loader).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from megatron_ext.audio.features import log_mel_chunks
from megatron_ext.data.chat import ChatEncoder, load_tokenizer
from megatron_ext.data.loader import SFTData
from megatron_ext.testing.tiny_chats import audio_chat
from megatron_ext.testing.tiny_models import VOCAB_SIZE
from megatron_ext.tokenizer.tekken_builder import build_tekken, voxtral_spec, write_tekken
from megatron_ext.training.config import DataSection, SourceSection

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
# The paper's run (examples/configs/devstral_audio_sft.yaml; FACTS.md section 7): 32 x 131072 tokens per step,
# 128 GPUs at TP 4 = 32 data-parallel ranks, ~18 s per step (target <= 18.5 s at 4M tokens).
PAPER_TOKENS_PER_STEP = 32 * 131072
PAPER_DP_RANKS = 128 // 4
PAPER_STEP_S = 18.0


def needed_tokens_per_s() -> float:
    """Packed tokens per second one data-parallel rank consumes in the paper's run (~7.3k)."""
    return PAPER_TOKENS_PER_STEP / PAPER_DP_RANKS / PAPER_STEP_S


@dataclass(frozen=True)
class LoaderResult:
    """Packed (non-padding) tokens delivered to the training process, wall time, CPU time of all processes and
    of the training process alone (what stays on the training loop's critical path)."""

    tokens: int
    wall_s: float
    cpu_s: float
    main_cpu_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def tokens_per_cpu_s(self) -> float:
        """Tokens per CPU-second over all processes: the cost, whatever share of a busy machine the run got."""
        return self.tokens / self.cpu_s


def _cpu_s() -> tuple[float, float]:
    """CPU seconds of this process and its live children (the pool's workers), and of this process alone."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    mine = me.cpu_times()
    return total, mine.user + mine.system


def librivox_clips(directory: Path = LIBRIVOX) -> list[tuple[Path, str]]:
    """(wav, transcript) of the five LibriVox recordings; FileNotFoundError if the package is missing."""
    table = directory / "transcription"
    if not table.is_file():
        raise FileNotFoundError(f"{table}: missing (install the Debian package pocketsphinx-testdata)")
    found = (re.match(r"<s>\s*(.*?)\s*</s>\s*\(([\w-]+)\)", line) for line in table.read_text().splitlines())
    return [(directory / f"{m.group(2)}.wav", m.group(1)) for m in found if m]


def prepare(workdir: Path, text_input: Path, copies: int) -> dict[str, Path]:
    """The tiny tokenizer and the two JSONL sources (`copies` copies of each sample set) under `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_tekken(build_tekken(voxtral_spec(VOCAB_SIZE)), workdir / "tekken.json")
    text = [line for line in text_input.read_text().splitlines() if line.strip()]
    audio = [json.dumps(audio_chat(wav, transcript)) for wav, transcript in librivox_clips()]
    paths = {"tokenizer": workdir / "tekken.json"}
    for name, lines in (("text", text), ("audio", audio)):
        paths[name] = workdir / f"{name}.jsonl"
        paths[name].write_text("\n".join(lines * copies) + "\n")
    return paths


def _mel(wave) -> torch.Tensor:
    return log_mel_chunks(wave)[0]


def bench_loader(paths: dict[str, Path], modality: str, workers: int, seq_length: int, rows: int) -> LoaderResult:
    """Time `rows` packed sequences of one modality (after one warm-up sequence) with `workers` processes."""
    encoder = ChatEncoder(load_tokenizer(paths["tokenizer"]), tokens_per_chunk=375, audio_token_id=24)
    cfg = DataSection(
        sources=[SourceSection(name=modality, path=str(paths[modality]), modality=modality)],
        num_workers=workers,
    )
    data = SFTData(cfg, seq_length, 1234, encoder, _mel)
    try:
        data.step_batches(1, 1)
        start, (cpu, main_cpu), tokens = time.perf_counter(), _cpu_s(), 0
        for _ in range(rows):
            (batch,) = data.step_batches(1, 1)
            tokens += int((batch["source_ids"] >= 0).sum())
        wall = time.perf_counter() - start
        cpu_end, main_cpu_end = _cpu_s()
        return LoaderResult(tokens, wall, cpu_end - cpu, main_cpu_end - main_cpu)
    finally:
        data.close()
