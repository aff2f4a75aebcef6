"""The one HTTP client (httpx2) against a real server on 127.0.0.1: bearer key from the environment and never
in an error, retries on 5xx, no retry on 4xx, connection errors, and `$OPENAI_BASE_URL` as the default
endpoint of the synth judge and TTS and of the evaluation judge."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from synth_http_server import FakeEndpoints

from megatron_ext.audio.tts import EspeakTTS, HttpTTS, make_tts
from megatron_ext.data.synth.config import SynthConfig
from megatron_ext.eval.judge import make_answer_judge
from megatron_ext.http_client import EndpointError, RetryPolicy, api_key, endpoint_url, post_json

FAST = RetryPolicy(timeout_s=2.0, retries=2, backoff_s=0.01)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "run the tests"}]}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "object"}}}


def test_post_sends_json_and_bearer_key_and_retries_5xx(monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", "sk-secret-judge")
    with FakeEndpoints() as server:
        server.faults["/v1/chat/completions"].extend(["500", "500"])
        body = post_json(
            server.base_url + "/chat/completions", CHAT | {"response_format": SCHEMA}, FAST, api_key("JUDGE_API_KEY")
        )
    assert b'"choices"' in body
    assert len(server.requests) == 3
    path, headers, sent = server.requests[-1]
    assert path == "/v1/chat/completions" and sent["messages"] == CHAT["messages"]
    assert headers["Authorization"] == "Bearer sk-secret-judge"
    assert headers["Content-Type"] == "application/json"


def test_client_errors_are_not_retried_and_the_key_is_never_in_the_message():
    with FakeEndpoints() as server:
        with pytest.raises(EndpointError, match="after 1 attempt.*HTTP 400") as info:
            post_json(server.base_url + "/chat/completions", CHAT, FAST, "sk-secret-key")  # no json_schema: 400
        assert len(server.requests) == 1
    assert "sk-secret" not in str(info.value)
    assert isinstance(info.value, OSError)  # the CLIs report OSError as one `error:` line


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(EndpointError, match=r"after 3 attempt\(s\): ConnectError"):
        post_json(f"http://127.0.0.1:{port}/v1/chat/completions", CHAT, FAST)


def test_openai_base_url_is_the_default_endpoint_when_a_model_is_named(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert endpoint_url(None, "judge") is None
    with FakeEndpoints() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        assert endpoint_url("http://explicit/v1", "judge") == "http://explicit/v1"
        assert endpoint_url(None, None) is None  # no model named: offline path, even with the variable set
        tts = make_tts("espeak", None, "clone-tts", FAST)
        assert isinstance(tts, HttpTTS) and tts.url == server.base_url + "/audio/speech"
        assert isinstance(make_tts("espeak", None, None, FAST), EspeakTTS)
        cfg = SynthConfig(input=tmp_path / "in.jsonl", output=tmp_path / "out", judge_model="judge")
        assert cfg.judge_endpoint == server.base_url and cfg.identity()["judge"] == "judge"
        judge = make_answer_judge(None, "grader")
        assert judge is not None and judge.url == server.base_url + "/chat/completions"
        assert make_answer_judge(None, None) is None
