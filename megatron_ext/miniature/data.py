"""The miniature's training and held-out files, written from the task generators (tasks.py).

Training (SFT-loop JSONL, data/chat.py's sample kinds): `base.jsonl` (plain documents, loss on every token),
`devstral.jsonl` (tool-call chats with tools), `voxtral.jsonl` (transcriptions of sentences and of spoken coding
instructions from the tool-call train split, as Voxtral hears technical speech too, and spoken questions).
Held out (the evaluation's benchmark formats, eval/benchmarks.py): `heldout/asr.jsonl` (librispeech),
`heldout/qa.jsonl` (llama_questions) and `heldout/tool_calls.jsonl` (tasks.py records). Speech comes from
the project's TTS engines, one voice per clip drawn round-robin from `voices`, so every voice is heard in
training and in the held-out set.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatron_ext.audio.tts import TTS, EspeakTTS, PiperTTS
from megatron_ext.audio.waveform import encode_wav
from megatron_ext.checkpoint.atomic import write_atomic
from megatron_ext.miniature.tasks import (
    base_corpus,
    spoken_qa_tasks,
    tool_call_chat,
    tool_call_tasks,
    transcription_tasks,
)

# Two voices keep the TTS cheap and the tiny encoder's task small: with these two, 360 steps reached held-out WER
# 0.125 (0.13 in the unseen espeak en-us+m3 voice the recipe evaluates in).
DEFAULT_VOICES = ("piper", "espeak:en-us")


def make_engine(voice: str) -> TTS:
    """`piper` (the bundled joe-us voice) or `espeak:VOICE` (an espeak-ng voice name)."""
    if voice == "piper":
        return PiperTTS()
    engine, _, name = voice.partition(":")
    if engine != "espeak" or not name:
        raise ValueError(f"voice {voice!r}: expected 'piper' or 'espeak:NAME'")
    return EspeakTTS(name)


_ENGINES: dict[str, TTS] = {}  # per process: each pool worker makes an engine once, on first use


def _wav_b64(job: tuple[str, str]) -> str:
    """(voice, text) -> the spoken text as a base64 WAV."""
    voice, text = job
    if voice not in _ENGINES:
        _ENGINES[voice] = make_engine(voice)
    samples = np.asarray(_ENGINES[voice].synthesize(text, None), dtype=np.float32)
    return base64.b64encode(encode_wav(samples)).decode("ascii")


def speak_all(texts: Sequence[str], voices: Sequence[str], workers: int | None = None) -> list[str]:
    """Every text spoken as a base64 WAV, the voices taken round-robin in order, over a process pool (one
    worker per core by default; the clips do not depend on how they are spread)."""
    jobs = [(voices[i % len(voices)], text) for i, text in enumerate(texts)]
    with multiprocessing.get_context("spawn").Pool(workers or os.cpu_count() or 1) as pool:
        return pool.map(_wav_b64, jobs, chunksize=16)


def _audio_part(b64: str) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _transcription(wav: str, text: str) -> dict[str, Any]:
    return {"transcription": {"input_audio": {"data": wav, "format": "wav"}, "language": "en", "text": text}}


def write_data(
    out: Path, seed: int, voices: Sequence[str], clips_per_sentence: int, instruction_clips: int
) -> dict[str, Path]:
    """Write every training and held-out file under `out`; returns name -> path. `instruction_clips`: how many
    tool-call train instructions Voxtral-mini also learns to transcribe."""
    tools, asr, qa = tool_call_tasks(seed), transcription_tasks(seed), spoken_qa_tasks(seed)
    texts = {
        "asr": [r["text"] for r in asr.train for _ in range(clips_per_sentence)],
        "instructions": [r["instruction"] for r in tools.train[:instruction_clips]],
        "qa": [r["question"] for r in qa.train for _ in range(clips_per_sentence)],
        "heldout_asr": [r["text"] for r in asr.heldout],
        "heldout_qa": [r["question"] for r in qa.heldout],
    }
    spoken = iter(speak_all([t for group in texts.values() for t in group], voices))
    wavs = {name: [next(spoken) for _ in group] for name, group in texts.items()}
    speech = [_transcription(w, t) for w, t in zip(wavs["asr"], texts["asr"], strict=True)]
    speech += [_transcription(w, t) for w, t in zip(wavs["instructions"], texts["instructions"], strict=True)]
    answers = [r["answer"] for r in qa.train for _ in range(clips_per_sentence)]
    speech += [
        {"messages": [{"role": "user", "content": [_audio_part(w)]}, {"role": "assistant", "content": a}]}
        for w, a in zip(wavs["qa"], answers, strict=True)
    ]
    files = {
        "base": (out / "base.jsonl", [{"text": t} for t in base_corpus(seed)]),
        "devstral": (out / "devstral.jsonl", [tool_call_chat(r) for r in tools.train]),
        "voxtral": (out / "voxtral.jsonl", speech),
        "heldout_tool_calls": (out / "heldout" / "tool_calls.jsonl", tools.heldout),
        "heldout_asr": (
            out / "heldout" / "asr.jsonl",
            [
                {"id": r["id"], "audio_b64": w, "text": r["text"]}
                for r, w in zip(asr.heldout, wavs["heldout_asr"], strict=True)
            ],
        ),
        "heldout_qa": (
            out / "heldout" / "qa.jsonl",
            [
                {"id": r["id"], "audio_b64": w, "answers": [r["answer"].rstrip(".")], "question": r["question"]}
                for r, w in zip(qa.heldout, wavs["heldout_qa"], strict=True)
            ],
        ),
    }
    for path, rows in files.values():
        _write_jsonl(path, rows)
    return {name: path for name, (path, _) in files.items()}
