"""Shared audio I/O on real LibriVox speech: the log-mel front-end vs transformers' WhisperFeatureExtractor
(Voxtral's settings), and the one resampler (soxr HQ) vs what mistral-common feeds Voxtral in training."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from mistral_common.tokens.tokenizers.audio import Audio
from transformers import WhisperFeatureExtractor

from megatron_ext.audio.features import log_mel_chunks, mel_filters
from megatron_ext.audio.waveform import SAMPLE_RATE, decode_audio, encode_wav, load_audio, to_16k_mono

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0930.wav")
TOL = 1e-5  # log-mel units ((log10 + 4) / 4); float32 STFT order-of-summation differences only


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


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


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


def test_log_mel_of_resampled_speech_matches_whisper_feature_extractor(reference: WhisperFeatureExtractor) -> None:
    """44.1 kHz stereo speech through decode + resample + log-mel, against the HF extractor on the same samples."""
    speech = load_audio(LIBRIVOX).numpy()
    hi = Audio(speech.copy(), SAMPLE_RATE, format="wav")
    hi.resample(44_100)
    stereo = np.stack([hi.audio_array, 0.5 * hi.audio_array], axis=1).astype(np.float32)
    wave = torch.from_numpy(to_16k_mono(*decode_audio(_wav(stereo, 44_100))))
    assert abs(wave.numel() - speech.size) <= 1
    assert (log_mel_chunks(wave) - _hf_chunks(reference, wave)).abs().max().item() < TOL


@pytest.mark.parametrize("rate", [8_000, 22_050, 48_000])
def test_resampler_is_mistral_commons(rate: int) -> None:
    """Training audio goes through mistral-common's soxr HQ resampler; ours must give the very same samples."""
    speech = load_audio(LIBRIVOX).numpy()
    source = Audio(speech.copy(), SAMPLE_RATE, format="wav")
    source.resample(rate)
    theirs = Audio(source.audio_array.copy(), rate, format="wav")
    theirs.resample(SAMPLE_RATE)
    ours = to_16k_mono(source.audio_array, rate)
    assert ours.dtype == np.float32 and ours.ndim == 1
    assert np.array_equal(ours, theirs.audio_array.astype(np.float32))


def test_resampling_round_trip_keeps_speech() -> None:
    """16 kHz -> 48 kHz -> 16 kHz changes the speech by less than 1e-3 RMS relative to its own RMS."""
    speech = load_audio(LIBRIVOX).numpy()
    up = Audio(speech.copy(), SAMPLE_RATE, format="wav")
    up.resample(48_000)
    back = to_16k_mono(up.audio_array, 48_000)
    assert back.shape == speech.shape
    assert np.sqrt(np.mean((back - speech) ** 2)) < 1e-3 * np.sqrt(np.mean(speech**2))


def test_encode_wav_clips_and_round_trips() -> None:
    samples = np.array([0.0, 0.5, -0.25, 1.5, -2.0], dtype=np.float32)
    decoded, rate = decode_audio(encode_wav(samples))
    assert rate == SAMPLE_RATE
    np.testing.assert_allclose(decoded, [0.0, 0.5, -0.25, 1.0, -1.0], atol=1 / 32767)


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mono waveform"):
        log_mel_chunks(torch.zeros(2, 100))
    bad = tmp_path / "not-audio.wav"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not-audio.wav: cannot read audio"):
        load_audio(bad)
    with pytest.raises(ValueError, match="missing.wav: cannot read audio"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="reply: no audio frames"):
        decode_audio(_wav(np.zeros(0, dtype=np.float32), SAMPLE_RATE), "reply")
