"""Local benchmark files (JSONL, one sample per line) and how each benchmark turns into prompts and scores.

Formats (all fields per line; `audio` is a WAV/FLAC path relative to the JSONL file, or `audio_b64` holds
the file's bytes base64-encoded; any sample rate, resampled to 16 kHz mono):
- fleurs, librispeech (ASR):   {"id", "audio" | "audio_b64", "text": reference transcript}
- llama_questions (spoken QA): {"id", "audio" | "audio_b64", "answers": [acceptable answers], "question"?}
- mmlu_text:                   {"id", "question", "choices": [2..10 strings], "answer": "B" | 1}
- mmlu_audio (spoken MMLU):    the mmlu_text fields plus "audio" | "audio_b64" (question and choices read aloud)
- toolcall_typed:              {"id", "instruction", "tools": [function schemas], "answer": {"name", "arguments"}}
- toolcall_spoken:             the same without "instruction", plus "audio" | "audio_b64" (the instruction spoken)
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_ext.audio.waveform import decode_audio, to_16k_mono
from megatron_ext.audio.wer import word_errors
from megatron_ext.errors import ProjectError
from megatron_ext.eval import metrics, toolcall

MCQ_INSTRUCTION = "Answer with the letter of the correct choice only."


class BenchmarkFormatError(ProjectError, ValueError):
    """A benchmark file line that does not follow its documented format."""


@dataclass(frozen=True)
class Sample:
    """One benchmark item: its JSON fields plus where its audio lives (decoded only when needed)."""

    id: str
    fields: dict
    audio_source: str | None  # absolute path, or None when the audio is inline (`audio_b64`)
    where: str  # "file:line", for error messages

    def audio(self) -> np.ndarray:
        """The sample's audio as 16 kHz mono float32."""
        try:
            if self.audio_source is not None:
                data = Path(self.audio_source).read_bytes()
            else:
                data = base64.b64decode(self.fields["audio_b64"], validate=True)
        except (OSError, ValueError) as e:  # binascii.Error is a ValueError
            raise BenchmarkFormatError(f"{self.where}: cannot read audio: {e}") from e
        try:
            return to_16k_mono(*decode_audio(data, self.where))
        except ValueError as e:
            raise BenchmarkFormatError(str(e)) from None


@dataclass(frozen=True)
class Benchmark:
    """How one benchmark is read, prompted and scored."""

    name: str
    kind: str  # "asr" | "spoken_qa" | "mcq" | "toolcall"
    needs_audio: bool
    metric: str
    higher_is_better: bool

    @property
    def required(self) -> tuple[str, ...]:
        return {
            "asr": ("text",),
            "spoken_qa": ("answers",),
            "mcq": ("question", "choices", "answer"),
            "toolcall": ("tools", "answer") if self.needs_audio else ("instruction", "tools", "answer"),
        }[self.kind]

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether predictions are decoded with control tokens kept (a tool call is spelled with them)."""
        return self.kind == "toolcall"

    def score(self, sample: Sample, prediction: str) -> dict:
        """Per-sample score fields kept next to the prediction."""
        if self.kind == "asr":
            result = word_errors([sample.fields["text"]], [prediction])
            return {"errors": result.errors, "reference_words": result.reference_words}
        if self.kind == "spoken_qa":
            return {"correct": metrics.answer_contained(prediction, sample.fields["answers"])}
        if self.kind == "toolcall":
            return toolcall.score_tool_call(prediction, sample.fields["answer"])
        letter = metrics.extract_choice(prediction, len(sample.fields["choices"]))
        return {"letter": letter, "correct": letter == answer_letter(sample)}

    def aggregate(self, scores: Sequence[dict]) -> float:
        """The headline number from per-sample scores: corpus WER for ASR, else mean accuracy."""
        if self.kind == "asr":
            words = sum(s["reference_words"] for s in scores)
            if words == 0:
                raise ValueError(f"{self.name}: all references are empty after normalisation: WER is undefined")
            return sum(s["errors"] for s in scores) / words
        return metrics.mean([s["correct"] for s in scores])


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("fleurs", "asr", True, "wer", False),
        Benchmark("librispeech", "asr", True, "wer", False),
        Benchmark("llama_questions", "spoken_qa", True, "accuracy", True),
        Benchmark("mmlu_audio", "mcq", True, "accuracy", True),
        Benchmark("mmlu_text", "mcq", False, "accuracy", True),
        Benchmark("toolcall_typed", "toolcall", False, "accuracy", True),
        Benchmark("toolcall_spoken", "toolcall", True, "accuracy", True),
    )
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def answer_letter(sample: Sample) -> str:
    """The gold choice letter; `answer` may be a letter or a 0-based index."""
    answer = sample.fields["answer"]
    return metrics.LETTERS[answer] if isinstance(answer, int) else str(answer).strip().upper()


def mcq_text(sample: Sample, with_question: bool = True) -> str:
    """The text part of a multiple-choice prompt: question and lettered choices (unless they are spoken)
    followed by the answer instruction."""
    lines = []
    if with_question:
        lines.append(sample.fields["question"].strip())
        lines += [f"{metrics.LETTERS[i]}. {c}" for i, c in enumerate(sample.fields["choices"])]
    return "\n".join(lines + [MCQ_INSTRUCTION])


def load_samples(bench: Benchmark, path: str | Path) -> list[Sample]:
    """Read and validate a benchmark JSONL file; BenchmarkFormatError names the file, line and field."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise BenchmarkFormatError(f"{path}: cannot read benchmark file: {e.strerror}") from e
    samples, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(f"{where}: not JSON: {e.msg}") from e
        samples.append(_validated(bench, fields, where, path.parent, seen))
    if not samples:
        raise BenchmarkFormatError(f"{path}: no samples")
    return samples


def _validated(bench: Benchmark, fields: object, where: str, base: Path, seen: set[str]) -> Sample:
    if not isinstance(fields, dict):
        raise BenchmarkFormatError(f"{where}: expected a JSON object")
    for key in ("id", *bench.required):
        if key not in fields:
            raise BenchmarkFormatError(f"{where}: missing field {key!r} (benchmark {bench.name})")
    sample_id = str(fields["id"])
    if sample_id in seen:
        raise BenchmarkFormatError(f"{where}: duplicate id {sample_id!r}")
    seen.add(sample_id)
    if bench.kind == "spoken_qa" and not (isinstance(fields["answers"], list) and fields["answers"]):
        raise BenchmarkFormatError(f"{where}: field 'answers' must be a non-empty list")
    if bench.kind == "mcq":
        _check_mcq(fields, where)
    if bench.kind == "toolcall":
        _check_toolcall(fields, where)
    audio_source = None
    if bench.needs_audio:
        if "audio" in fields:
            audio_source = str((base / fields["audio"]).resolve())
            if not Path(audio_source).is_file():
                raise BenchmarkFormatError(f"{where}: field 'audio': no such file {audio_source}")
        elif "audio_b64" not in fields:
            raise BenchmarkFormatError(f"{where}: needs field 'audio' (path) or 'audio_b64'")
    return Sample(sample_id, fields, audio_source, where)


def _check_mcq(fields: dict, where: str) -> None:
    choices, answer = fields["choices"], fields["answer"]
    if not (isinstance(choices, list) and 2 <= len(choices) <= len(metrics.LETTERS)):
        raise BenchmarkFormatError(f"{where}: field 'choices' must be a list of 2..{len(metrics.LETTERS)} strings")
    valid = metrics.LETTERS[: len(choices)]
    ok = (isinstance(answer, int) and 0 <= answer < len(choices)) or (
        isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in valid
    )
    if not ok:
        raise BenchmarkFormatError(f"{where}: field 'answer' must be one of {list(valid)} or an index, got {answer!r}")


def _check_toolcall(fields: dict, where: str) -> None:
    if not (isinstance(fields["tools"], list) and fields["tools"]):
        raise BenchmarkFormatError(f"{where}: field 'tools' must be a non-empty list of function schemas")
    try:
        toolcall.expected_call(fields["answer"])
    except ValueError as e:
        raise BenchmarkFormatError(f"{where}: {e}") from None
