"""Intelligibility of the offline TTS: faster-whisper tiny.en WER on the bundled sample (slow)."""

from pathlib import Path

import pytest

from megatron_ext.data.synth.config import SynthConfig
from megatron_ext.data.synth.intelligibility import score_wer
from megatron_ext.data.synth.pipeline import run

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "coding_trajectories.jsonl"


@pytest.mark.slow
def test_piper_speech_of_the_bundled_sample_is_intelligible(tmp_path):
    cfg = SynthConfig(input=SAMPLE, output=tmp_path / "out", tts_engine="piper", energon_prepare=False)
    report = run(cfg)
    score = score_wer(sorted(cfg.output.glob("samples-*.jsonl")))
    assert score["turns"] == report["voiced"] == 10
    assert score["wer"] <= 0.15, score
