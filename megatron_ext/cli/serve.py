"""Serve a checkpoint as a small OpenAI-compatible endpoint (greedy chat completions, text and input_audio).

  serve.py --checkpoint DIR [--name NAME] [--host 127.0.0.1] [--port 8000] [--dtype bf16] [--backend megatron|hf]
  serve.py --checkpoint DIR [--name NAME] --print-name      (the served name only; nothing is loaded)

Routes: GET /v1/models, POST /v1/chat/completions (one user message of `text` / `input_audio` parts, base64
WAV as vLLM's Voxtral takes it, or a whole conversation with `tools`; `max_tokens`; greedy only; extra field
`transcription_language` for Voxtral's ASR prompt). The prompt is built by `eval.prompts.prompt_from_request`,
the same code the in-process evaluation uses, so `evaluate.py --backend openai` against this server gives
its records. With `tools` in the request, Mistral tool calls in the output (`[TOOL_CALLS]name[ARGS]{...}`,
or the JSON list of v7 tokenizers) come back as OpenAI `tool_calls` (finish_reason "tool_calls").
The served model name is `NAME@FINGERPRINT12` (`eval.identity.served_name`; NAME: --name or the record
name), so a SWE-Bench report naming it can be ingested for this checkpoint and no other.
One request at a time (queued connections wait); prints `serving NAME@FINGERPRINT12 at http://HOST:PORT/v1`
once listening (port 0 picks a free one). For trying a checkpoint and pointing an agent harness at it; not a
production server.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from megatron_ext.cli._errors import error_policy
from megatron_ext.eval.generation import DTYPES, Generator, load_generator
from megatron_ext.eval.identity import served_name
from megatron_ext.eval.prompts import load_tokenizer, prompt_from_request
from megatron_ext.eval.tool_calls import split_tool_calls

DEFAULT_MAX_TOKENS = 128


class ChatServer(HTTPServer):
    """An HTTP server over one generator and its tokenizer: one request at a time, on the main thread (the
    CPU patches' torch function mode is per thread), one request per connection (HTTP/1.0)."""

    def __init__(self, address: tuple[str, int], generator: Generator, tokenizer, model_name: str):
        super().__init__(address, _Handler)
        self.generator, self.tokenizer, self.model_name = generator, tokenizer, model_name

    def complete(self, body: dict) -> dict:
        """The chat.completion object for a request body; ValueError for a request this server cannot serve."""
        if body.get("stream"):
            raise ValueError("stream=true is not supported")
        if float(body.get("temperature") or 0.0) != 0.0:
            raise ValueError("only greedy decoding (temperature 0) is served")
        limit = body.get("max_tokens", body.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"max_tokens: expected a positive integer, got {limit!r}")
        prompt = prompt_from_request(self.tokenizer, body)
        tokens = self.generator.generate([prompt], limit)[0]
        message: dict = {"role": "assistant", "content": self.tokenizer.decode(tokens)}
        finish = "length" if len(tokens) >= limit else "stop"
        if body.get("tools"):
            content, calls = split_tool_calls(self.tokenizer, tokens)
            if calls:
                message, finish = {"role": "assistant", "content": content or None, "tool_calls": calls}, "tool_calls"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": len(prompt.tokens),
                "completion_tokens": len(tokens),
                "total_tokens": len(prompt.tokens) + len(tokens),
            },
        }


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, format: str, *args) -> None:  # quiet: one line per request is noise in tests and logs
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            return self._error(404, f"no route GET {self.path}", "not_found")
        self._json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model"}]})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route POST {self.path}", "not_found")
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            return self._error(400, f"request body is not JSON: {e.msg}", "invalid_request_error")
        if not isinstance(body, dict):
            return self._error(400, "request body must be a JSON object", "invalid_request_error")
        if body.get("model") != self.server.model_name:
            return self._error(404, f"model {body.get('model')!r} is not served here", "model_not_found")
        try:
            answer = self.server.complete(body)
        except ValueError as e:
            return self._error(400, str(e), "invalid_request_error")
        self._json(200, answer)

    def _error(self, status: int, message: str, code: str) -> None:
        self._json(status, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Checkpoint, served name, address, and the in-process generator's settings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (weights + tekken.json)")
    parser.add_argument("--name", help="NAME of the served name NAME@FINGERPRINT12 (default: the record name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed)")
    parser.add_argument("--backend", choices=("megatron", "hf"), default="megatron", help="in-process generator")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights and activations")
    parser.add_argument(
        "--print-name", action="store_true", help="print the served name (e.g. for vLLM's --served-model-name) and exit"
    )
    return parser.parse_args(argv)


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-serve: load the checkpoint, listen, serve until interrupted."""
    args = parse_args(argv)
    name = served_name(args.checkpoint, args.name)
    if args.print_name:
        print(name)
        return 0
    tokenizer = load_tokenizer(args.checkpoint)
    generator = load_generator(args.checkpoint, args.backend, args.dtype)
    server = ChatServer((args.host, args.port), generator, tokenizer, name)
    host, port = server.server_address[:2]
    print(f"serving {name} at http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
