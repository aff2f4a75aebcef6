"""Make the spoken version of a text benchmark with the shared TTS engines (e.g. MMLU -> MMLU Audio).

Each output line is the input line plus `audio` (a WAV beside the output JSONL, in `<stem>_audio/`) or
`audio_b64`; existing WAVs are reused, so a rerun resumes. What is spoken: the transcript for ASR,
the question for spoken QA, the question and its lettered choices for multiple choice, the instruction
for a tool call.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

from tqdm import tqdm

from megatron_ext.audio.tts import TTS
from megatron_ext.audio.voices import RefVoice, pick_voice
from megatron_ext.audio.waveform import encode_wav
from megatron_ext.checkpoint.atomic import write_atomic
from megatron_ext.eval.benchmarks import Sample, get_benchmark, load_samples
from megatron_ext.eval.metrics import LETTERS
from megatron_ext.eval.store import write_jsonl


def spoken_text(kind: str, sample: Sample) -> str:
    """The words a reader says for one sample of a benchmark of this kind."""
    fields = sample.fields
    if kind == "asr":
        return fields["text"]
    if kind == "spoken_qa":
        return fields["question"]
    if kind == "toolcall":
        return fields["instruction"]
    choices = " ".join(f"{LETTERS[i]}: {c}." for i, c in enumerate(fields["choices"]))
    return f"{fields['question'].strip()} {choices}"


def voice_benchmark(
    benchmark: str,
    data: str | Path,
    output: str | Path,
    tts: TTS,
    *,
    voices: list[RefVoice] | None = None,
    inline: bool = False,
    seed: int = 0,
) -> int:
    """Speak every sample of a text benchmark file into `output` (a benchmark file with audio); returns the count."""
    bench = get_benchmark(benchmark)
    if not bench.needs_audio:
        raise ValueError(f"benchmark {benchmark} is text-only; voice one of its spoken counterparts instead")
    samples = load_samples(dataclasses.replace(bench, needs_audio=False), data)
    output = Path(output)
    audio_dir = output.parent / f"{output.stem}_audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for row, sample in enumerate(tqdm(samples, desc=f"voice {benchmark}")):
        if bench.kind == "spoken_qa" and "question" not in sample.fields:
            raise ValueError(f"{sample.where}: missing field 'question' (the text to speak)")
        wav = audio_dir / f"{_safe(sample.id)}.wav"
        if not wav.exists():
            voice = pick_voice(voices, seed, row, 0) if voices else None
            write_atomic(wav, encode_wav(tts.synthesize(spoken_text(bench.kind, sample), voice)))
        fields = {k: v for k, v in sample.fields.items() if k not in ("audio", "audio_b64")}
        if inline:
            fields["audio_b64"] = base64.b64encode(wav.read_bytes()).decode("ascii")
        else:
            fields["audio"] = str(wav.relative_to(output.parent))
        rows.append(fields | {"tts": tts.name})
    write_jsonl(output, rows)
    load_samples(bench, output)  # the result must be a valid benchmark file
    return len(rows)


def _safe(sample_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in sample_id)
