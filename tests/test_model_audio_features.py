"""Log-mel front-end vs transformers' WhisperFeatureExtractor (Voxtral's settings), on real LibriVox speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from megatron_ext.models.audio_features import load_audio, log_mel_chunks, mel_filters

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0930.wav")
TOL = 1e-5


@pytest.fixture(scope="module")
def reference() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=128)


def _hf_chunks(fe: WhisperFeatureExtractor, wave: torch.Tensor) -> torch.Tensor:
    """What VoxtralProcessor does: pad to a multiple of 30 s, extract, split into 3000-frame chunks."""
    out = fe(
        wave.numpy(),
        sampling_rate=16000,
        padding=True,
        truncation=False,
        pad_to_multiple_of=480000,
        return_tensors="pt",
    )["input_features"]
    return out.reshape(128, -1, 3000).transpose(0, 1)


def test_mel_filters_match(reference: WhisperFeatureExtractor) -> None:
    assert np.abs(mel_filters().double().numpy() - reference.mel_filters).max() < 1e-7


@pytest.mark.parametrize("seconds", [None, 31.0])
def test_log_mel_matches_whisper_feature_extractor(reference: WhisperFeatureExtractor, seconds: float | None) -> None:
    speech = load_audio(LIBRIVOX)
    if seconds is not None:  # a clip longer than 30 s: two chunks, one STFT across the boundary
        speech = speech.repeat(int(seconds * 16000) // speech.numel() + 1)[: int(seconds * 16000)]
    ours = log_mel_chunks(speech)
    ref = _hf_chunks(reference, speech)
    assert ours.shape == ref.shape == (1 if seconds is None else 2, 128, 3000)
    assert (ours - ref).abs().max().item() < TOL


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mono waveform"):
        log_mel_chunks(torch.zeros(2, 100))
    bad = tmp_path / "not-audio.wav"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not-audio.wav"):
        load_audio(bad)
