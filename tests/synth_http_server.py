"""A real HTTP server on 127.0.0.1 for the synth tests: OpenAI-style chat completions (json_schema) and
`POST /v1/audio/speech` (voice cloning request shape, espeak-ng speech), with injectable faults."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import soundfile as sf

from megatron_ext.data.synth import rules


class FakeEndpoints(ThreadingHTTPServer):
    """Serves both endpoints; `faults[path]` is a queue of "500" / "timeout" / "bad-schema" (a chat reply
    whose content breaks the JSON schema), consumed one per request."""

    daemon_threads = True

    def __init__(self, timeout_delay_s: float = 1.5):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.faults: dict[str, deque] = {"/v1/chat/completions": deque(), "/v1/audio/speech": deque()}
        self.requests: list[tuple[str, dict, dict]] = []
        self.timeout_delay_s = timeout_delay_s
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self) -> FakeEndpoints:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


def _chat(body: dict, break_schema: bool) -> tuple[int, bytes, str]:
    fmt = body.get("response_format", {})
    if fmt.get("type") != "json_schema" or "schema" not in fmt.get("json_schema", {}):
        return 400, b'{"error": "json_schema response_format required"}', "application/json"
    decision, spoken = rules.classify(body["messages"][-1]["content"])
    content = json.dumps({"decision": "MAYBE"} if break_schema else {"decision": decision, "spoken_text": spoken})
    reply = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }
    return 200, json.dumps(reply).encode(), "application/json"


def _speech(body: dict) -> tuple[int, bytes, str]:
    ref = body.get("ref_audio", "")
    prefix = "data:audio/wav;base64,"
    if not ref.startswith(prefix) or not body.get("ref_text") or not body.get("input"):
        return 400, b'{"error": "input, ref_audio (wav data URL) and ref_text required"}', "application/json"
    sf.info(io.BytesIO(base64.b64decode(ref[len(prefix) :])))  # the reference must be real audio
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us", "--stdout"], input=body["input"].encode(), capture_output=True, check=True
    ).stdout
    return 200, wav, "audio/wav"


class _Handler(BaseHTTPRequestHandler):
    server: FakeEndpoints

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append((self.path, dict(self.headers), body))
            queue = self.server.faults.get(self.path)
            fault = queue.popleft() if queue else None
        if fault == "timeout":
            time.sleep(self.server.timeout_delay_s)
        if fault == "500":
            status, data, ctype = 500, b'{"error": "forced"}', "application/json"
        elif self.path == "/v1/chat/completions":
            status, data, ctype = _chat(body, break_schema=fault == "bad-schema")
        elif self.path == "/v1/audio/speech":
            status, data, ctype = _speech(body)
        else:
            status, data, ctype = 404, b"{}", "application/json"
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (forced timeout)
