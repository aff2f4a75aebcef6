"""Audio helpers: everything the pipeline stores is 16 kHz mono 16-bit PCM WAV."""

import base64
import io
import subprocess

import numpy as np
import soundfile as sf

from megatron_ext.data.synth.errors import SynthError

SAMPLE_RATE = 16_000


def _raw_f32(rate: int) -> list[str]:
    return ["-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1", "-r", str(rate)]


def to_16k_mono(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Downmix to mono and resample to 16 kHz with sox's (deterministic) resampler, float32 in [-1, 1]."""
    audio = np.asarray(samples, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1, dtype=np.float32)
    if sample_rate != SAMPLE_RATE:
        cmd = ["sox", "-V1", *_raw_f32(sample_rate), "-", *_raw_f32(SAMPLE_RATE), "-"]
        try:
            done = subprocess.run(cmd, input=audio.astype("<f4").tobytes(), capture_output=True, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise SynthError(f"sox resampling failed (is Debian sox installed? `make system-deps`): {e}") from e
        audio = np.frombuffer(done.stdout, dtype="<f4").astype(np.float32)
    return np.clip(audio, -1.0, 1.0)


def encode_wav(samples_16k: np.ndarray) -> bytes:
    """Encode 16 kHz mono float samples as a PCM_16 WAV file (bytes)."""
    buf = io.BytesIO()
    sf.write(buf, samples_16k, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode any soundfile-readable audio bytes into (float32 samples, sample rate)."""
    samples, sample_rate = sf.read(io.BytesIO(data), dtype="float32")
    return samples, sample_rate


def wav_duration_s(data: bytes) -> float:
    """Duration in seconds of a WAV file given as bytes."""
    info = sf.info(io.BytesIO(data))
    return info.frames / info.samplerate


def to_data_url(wav: bytes) -> str:
    """A `data:audio/wav;base64,...` URL, the form voice-cloning endpoints take for `ref_audio`."""
    return "data:audio/wav;base64," + base64.b64encode(wav).decode("ascii")
