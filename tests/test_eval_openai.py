"""The OpenAI backend against a real server on 127.0.0.1: `tools/serve.py` serving the tiny Voxtral, directly
and through a proxy that injects 500s, timeouts, dropped connections and an outage; bad endpoints, model
names and data files give one `error:` line and record nothing."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import pytest

from megatron_ext.cli.evaluate import main as evaluate_main
from megatron_ext.eval.generation import MegatronGenerator
from megatron_ext.eval.identity import served_name
from megatron_ext.eval.openai_backend import OpenAIBackend
from megatron_ext.eval.runner import evaluate
from megatron_ext.http_client import EndpointError, RetryPolicy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "eval"
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
NAME = "tiny-voxtral"
FAST = RetryPolicy(timeout_s=20.0, retries=3, backoff_s=0.05)


@pytest.fixture(scope="module")
def model(tiny_dir) -> str:
    """The tiny Voxtral's served name: NAME@ its fingerprint."""
    return served_name(tiny_dir / "voxtral-hf", NAME)


@pytest.fixture(scope="module")
def served(tiny_dir, model) -> Iterator[str]:
    """`tools/serve.py` on a free port serving the tiny Voxtral; yields its base URL."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools/serve.py"), "--checkpoint", str(tiny_dir / "voxtral-hf")]
        + ["--port", "0", "--name", NAME],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {model} at http://127.0.0.1:"), line
        yield line.split(" at ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class FaultyProxy(ThreadingHTTPServer):
    """Forwards to `upstream`; POST number k (from 1) may get `faults[k]`: "500", "hang" (silence for `hang_s`,
    past the client's timeout, then a dropped connection) or "close" (drop the connection at once); after
    `outage_after` answered POSTs, every POST is a 503."""

    daemon_threads = True

    def __init__(self, upstream: str, faults: dict[int, str], hang_s: float = 0.0, outage_after: int | None = None):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = urlsplit(upstream)
        self.faults, self.hang_s, self.outage_after = faults, hang_s, outage_after
        self.posts, self.answered, self.texts = 0, 0, []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{self.upstream.path}"


class _ProxyHandler(BaseHTTPRequestHandler):
    server: FaultyProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._forward("GET", b"")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        proxy = self.server
        with proxy.lock:
            proxy.posts += 1
            number, down = proxy.posts, proxy.outage_after is not None and proxy.answered >= proxy.outage_after
        fault = "503" if down else proxy.faults.get(number)
        if fault in ("500", "503"):
            return self._reply(int(fault), b'{"error": {"message": "injected"}}')
        if fault == "hang":
            time.sleep(proxy.hang_s)
        if fault in ("close", "hang"):
            self.close_connection = True
            self.connection.close()
            return
        texts = [p.get("text") for p in json.loads(body)["messages"][0]["content"] if p.get("type") == "text"]
        with proxy.lock:
            proxy.texts.append(texts)
        self._forward("POST", body)
        with proxy.lock:
            proxy.answered += 1

    def _forward(self, method: str, body: bytes) -> None:
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        conn.request(method, self.path, body=body or None, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        self._reply(answer.status, answer.read())

    def _reply(self, status: int, data: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client already gave up
            pass


def _rows(record) -> dict[str, dict]:
    rows = [json.loads(x) for x in Path(record.source["predictions"]).read_text().splitlines()]
    assert len(rows) == len({r["id"] for r in rows}), "duplicate prediction rows"
    return {r["id"]: {k: v for k, v in r.items() if k != "run"} for r in rows}


@pytest.mark.skipif(not LIBRIVOX.is_dir(), reason="Debian pocketsphinx-testdata not installed")
def test_openai_backend_gives_the_in_process_records(tiny_dir, served, model, tmp_path):
    """LibriVox ASR (input_audio) and text MCQ: predictions, scores and values equal the in-process Megatron run."""
    checkpoint = tiny_dir / "voxtral-hf"
    local = MegatronGenerator.load(checkpoint)
    for bench in ("librispeech", "mmlu_text"):
        data = EXAMPLES / f"{bench}.jsonl"
        ref = evaluate(bench, checkpoint, data, tmp_path / "a" / "r.jsonl", generator=local, max_new_tokens=8)
        got = evaluate(
            bench,
            checkpoint,
            data,
            tmp_path / "b" / "r.jsonl",
            backend="openai",
            endpoint=served,
            model=model,
            max_new_tokens=8,
        )
        assert got.source["generator"] == f"openai:{model}"
        assert _rows(got) == _rows(ref) and got.value == ref.value and got.n == ref.n, bench


def test_faulty_server_loses_and_duplicates_no_record(tiny_dir, served, model, tmp_path):
    """An outage mid-run fails the run with finished batches kept; the rerun, through 500s, a timeout and a
    dropped connection, asks only for the rest; every sample ends with exactly the direct server's prediction."""
    checkpoint, data = tiny_dir / "voxtral-hf", EXAMPLES / "mmlu_text.jsonl"
    direct = evaluate(
        "mmlu_text", checkpoint, data, tmp_path / "d.jsonl", backend="openai", endpoint=served, model=model
    )
    results = tmp_path / "faulty" / "r.jsonl"
    run = {"batch_size": 2, "max_new_tokens": 16}

    down = FaultyProxy(served, {}, outage_after=3)
    with pytest.raises(EndpointError, match="HTTP 503"):
        evaluate("mmlu_text", checkpoint, data, results, generator=OpenAIBackend(down.url, model, 2, FAST), **run)
    down.shutdown()
    predictions = results.parent / "predictions" / f"{direct.checkpoint}.mmlu_text.jsonl"
    first = [json.loads(x) for x in predictions.read_text().splitlines()]
    assert 2 <= len(first) < direct.n and not results.exists()

    flaky = FaultyProxy(served, {1: "500", 2: "hang", 4: "close", 5: "500"}, hang_s=6.0)
    backend = OpenAIBackend(flaky.url, model, 2, RetryPolicy(timeout_s=5.0, retries=4, backoff_s=0.05))
    record = evaluate("mmlu_text", checkpoint, data, results, generator=backend, **run)
    flaky.shutdown()
    assert record.value == direct.value and record.n == direct.n
    assert _rows(record) == _rows(direct)
    assert flaky.posts >= direct.n - len(first) + 4  # every injected fault was met (and retried)
    asked = {t for texts in flaky.texts for t in texts}
    finished_texts = {_mcq_text(checkpoint, data, row["id"]) for row in first}
    assert not asked & finished_texts  # finished samples were not asked again


def _mcq_text(checkpoint: Path, data: Path, sample_id: str) -> str:
    from megatron_ext.eval.benchmarks import get_benchmark, load_samples
    from megatron_ext.eval.prompts import chat_request

    bench = get_benchmark("mmlu_text")
    sample = next(s for s in load_samples(bench, data) if s.id == sample_id)
    return chat_request(bench, sample)["messages"][0]["content"][-1]["text"]


@pytest.fixture
def static_site(tmp_path) -> Iterator[str]:
    """A plain file server whose /v1/models is an HTML page: an endpoint that is not OpenAI-compatible."""
    root = tmp_path / "site"
    (root / "v1").mkdir(parents=True)
    (root / "v1" / "models").write_text("<html><body>hello</body></html>")

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args):
            super().__init__(*args, directory=str(root))

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_bad_endpoint_model_and_data_are_one_line_errors(tiny_dir, served, model, static_site, tmp_path, capsys):
    good = EXAMPLES / "mmlu_text.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "question": "q?", "choices": ["a", "b"]}) + "\n")  # no answer
    cases = [
        (static_site, model, good, "not an OpenAI-compatible model list"),
        (served, "other-model", good, f"model 'other-model' is not served (serves: {model})"),
        (served, model, bad, "bad.jsonl:1"),
    ]
    for n, (endpoint, asked, data, message) in enumerate(cases):
        out = tmp_path / f"out{n}" / "results.jsonl"
        argv = ["mmlu_text", "--checkpoint", str(tiny_dir / "voxtral-hf"), "--data", str(data), "--output", str(out)]
        assert evaluate_main([*argv, "--backend", "openai", "--endpoint", endpoint, "--model", asked]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
        assert not out.parent.exists()  # nothing recorded, no predictions
    # the server itself: an unknown model is a 404, a malformed part a 400 naming it
    answer = httpx2.post(f"{served}/chat/completions", json={"model": "nope", "messages": []}, timeout=30)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
    body = {"model": model, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    answer = httpx2.post(f"{served}/chat/completions", json=body, timeout=30)
    assert answer.status_code == 400 and "messages[0].content[0]" in answer.json()["error"]["message"]
