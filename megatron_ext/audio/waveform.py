"""Waveform I/O shared by the model, evaluation and the synth pipeline: decode any soundfile format,
downmix, resample to 16 kHz with soxr, and encode 16 kHz mono PCM_16 WAV.

One resampler everywhere: soxr at "HQ" quality, the library and setting mistral-common uses when it
resamples Voxtral's audio for training and tokenisation (`Audio.resample`), so the model sees the same
16 kHz samples whichever path produced them. It is deterministic and runs in-process (no sox binary).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

SAMPLE_RATE = 16_000


def decode_audio(data: bytes, where: str = "audio") -> tuple[np.ndarray, int]:
    """(float32 samples [frames] or [frames, channels], sample rate) of any soundfile-readable bytes;
    ValueError naming `where` when they are not audio."""
    try:
        samples, sample_rate = sf.read(io.BytesIO(data), dtype="float32")
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot read audio ({e})") from None
    if len(samples) == 0:
        raise ValueError(f"{where}: no audio frames")
    return samples, sample_rate


def to_16k_mono(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Downmix to mono (channel mean) and resample to 16 kHz with soxr HQ; float32 [samples]."""
    audio = np.asarray(samples, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1, dtype=np.float32)
    if sample_rate != SAMPLE_RATE:
        audio = soxr.resample(audio, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(audio)


def load_audio(path: str | Path) -> torch.Tensor:
    """An audio file (WAV/FLAC/OGG...) as mono float32 at 16 kHz; ValueError naming the file if unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read audio ({e.strerror})") from None
    return torch.from_numpy(to_16k_mono(*decode_audio(data, str(path))))


def encode_wav(samples_16k: np.ndarray) -> bytes:
    """16 kHz mono float samples as PCM_16 WAV bytes, clipped to [-1, 1] first (resampling may overshoot)."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples_16k, -1.0, 1.0), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()
