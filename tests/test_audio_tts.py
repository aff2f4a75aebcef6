"""Speech synthesis (synth stage 2, spoken benchmarks): offline engines, LibriVox reference voices, and the
voice-cloning HTTP client with faults."""

import base64
import io

import numpy as np
import pytest
import soundfile as sf
from synth_http_server import FakeEndpoints

from megatron_ext.audio.tts import EspeakTTS, HttpTTS, PiperTTS
from megatron_ext.audio.voices import DEFAULT_VOICES, VoicesError, load_voices, pick_voice
from megatron_ext.audio.waveform import SAMPLE_RATE, encode_wav
from megatron_ext.http_client import EndpointError, RetryPolicy

FAST = RetryPolicy(timeout_s=0.5, retries=2, backoff_s=0.01)
TEXT = "Please add a unit test for the empty password case."


@pytest.mark.parametrize("engine", [EspeakTTS, PiperTTS])
def test_offline_engine_gives_deterministic_16k_mono_speech(engine):
    tts = engine()
    a, b = tts.synthesize(TEXT, None), tts.synthesize(TEXT, None)
    assert a.ndim == 1 and a.dtype == np.float32 and 1.5 < len(a) / SAMPLE_RATE < 8
    assert np.abs(a).max() > 0.05  # not silence
    assert np.array_equal(a, b)
    info = sf.info(io.BytesIO(encode_wav(a)))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")


def test_librivox_reference_voices_load_with_transcripts_and_seeded_choice():
    voices, problems = load_voices(DEFAULT_VOICES)
    assert len(voices) == 5 and problems == []
    by_name = {v.name: v for v in voices}
    assert by_name["sense_and_sensibility_01_austen_64kb-0880"].text == "he was not an ill disposed young man"
    picks = [pick_voice(voices, 7, row, 1).name for row in range(40)]
    assert picks == [pick_voice(voices, 7, row, 1).name for row in range(40)] and len(set(picks)) > 2


def test_unreadable_reference_clip_is_reported_and_skipped(tmp_path, capsys):
    good = DEFAULT_VOICES / "sense_and_sensibility_01_austen_64kb-0880.wav"
    (tmp_path / "good.wav").write_bytes(good.read_bytes())
    (tmp_path / "good.txt").write_text("he was not an ill disposed young man")
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00not really a wave file")
    (tmp_path / "broken.txt").write_text("anything")
    voices, problems = load_voices(tmp_path)
    assert [v.name for v in voices] == ["good"]
    assert len(problems) == 1 and "broken.wav: unreadable reference clip" in problems[0]
    assert "broken.wav" in capsys.readouterr().err
    (tmp_path / "good.wav").unlink()
    with pytest.raises(VoicesError, match="no usable reference clip"):
        load_voices(tmp_path)


def test_http_tts_sends_reference_clip_and_survives_500s():
    voice = load_voices(DEFAULT_VOICES)[0][0]
    with FakeEndpoints() as server:
        server.faults["/v1/audio/speech"].extend(["500", "500"])
        audio = HttpTTS(server.base_url, "clone-tts", FAST).synthesize(TEXT, voice)
        _, _, body = server.requests[-1]
    assert len(server.requests) == 3
    assert body["ref_text"] == voice.text and body["input"] == TEXT and body["model"] == "clone-tts"
    ref = base64.b64decode(body["ref_audio"].removeprefix("data:audio/wav;base64,"))
    assert ref == voice.wav and sf.info(io.BytesIO(ref)).samplerate == 16000
    assert audio.ndim == 1 and len(audio) / SAMPLE_RATE > 1.0  # espeak's 22.05 kHz reply, resampled


def test_http_tts_gives_up_after_retries_on_timeouts():
    voice = load_voices(DEFAULT_VOICES)[0][0]
    with FakeEndpoints(timeout_delay_s=1.0) as server:
        server.faults["/v1/audio/speech"].extend(["timeout"] * 3)
        with pytest.raises(EndpointError, match="after 3 attempt.*timeout"):
            HttpTTS(server.base_url, "clone-tts", FAST).synthesize(TEXT, voice)
