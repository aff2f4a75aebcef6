"""The library's one Whisper log-mel front-end: 16 kHz mono waveform -> [chunks, 128, 3000] encoder input
(used by training, evaluation and tools/logits.py).

As Voxtral prepares audio: pad the clip with silence to a multiple of 30 s, one STFT over the whole clip
(n_fft 400, periodic Hann window, hop 160, centred with reflect padding), power spectrum, 128 Slaney mel
bins (0-8 kHz, Slaney-normalised), log10 (floored at 1e-10), clamp to (clip max - 8), (x + 4) / 4, last
frame dropped, then split into 3000-frame chunks. Each chunk gives 1500 / stack audio tokens.
A smaller encoder may use shorter chunks (`chunk_frames`, = 2 x its max_source_positions; the miniature's
4 s chunks): the same code with another split, while Whisper's own dimensions keep 30 s (config.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megatron_ext.audio.waveform import SAMPLE_RATE

N_FFT = 400
HOP = 160
N_MELS = 128
CHUNK_SECONDS = 30
CHUNK_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS
CHUNK_FRAMES = CHUNK_SAMPLES // HOP  # 3000


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    log_step = math.log(6.4) / 27.0
    return np.where(hz < 1000.0, 3.0 * hz / 200.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / log_step)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    log_step = math.log(6.4) / 27.0
    return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * np.exp(log_step * (mel - 15.0)))


def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Slaney-normalised triangular mel filters [n_fft // 2 + 1, n_mels] (float32, computed in float64)."""
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]
    rising, falling = -slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]
    bank = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))
    return torch.from_numpy(bank).float()


def log_mel_chunks(waveform: torch.Tensor | np.ndarray, chunk_frames: int = CHUNK_FRAMES) -> torch.Tensor:
    """Mono 16 kHz waveform [samples] -> log-mel chunks [ceil(duration / chunk), 128, chunk_frames] (float32);
    the default chunk is Whisper's 30 s (3000 frames)."""
    wave = torch.as_tensor(np.asarray(waveform), dtype=torch.float32)
    if wave.dim() != 1 or wave.numel() == 0:
        raise ValueError(f"expected a non-empty mono waveform [samples], got shape {list(wave.shape)}")
    chunk_samples = chunk_frames * HOP
    chunks = math.ceil(wave.numel() / chunk_samples)
    wave = torch.nn.functional.pad(wave, (0, chunks * chunk_samples - wave.numel()))
    stft = torch.stft(wave, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    power = (stft[:, :-1].abs() ** 2).contiguous()  # [freq, chunks * 3000]
    log_spec = (mel_filters().T @ power).clamp(min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    return log_spec.reshape(N_MELS, chunks, chunk_frames).transpose(0, 1).contiguous()


def audio_tokens_per_chunk(max_source_positions: int = 1500, stack: int = 4) -> int:
    """[AUDIO] tokens each 30 s chunk needs: encoder frames / projector stack (375 for Voxtral)."""
    return max_source_positions // stack
