"""Benchmarks against a served model: OpenAI chat completions with `input_audio` parts (vLLM's Voxtral format).

`OpenAIBackend` checks the endpoint first (`GET /models` must list the model), then sends each sample's
`prompts.chat_request` body with greedy settings, `concurrency` requests at a time, through the project's
one HTTP client (timeouts, retries with backoff on 5xx/429/timeouts/dropped connections). The runner
appends finished predictions per batch and resumes them, so a run that dies mid-way loses only its open batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from megatron_ext.eval.generation import generator_name
from megatron_ext.http_client import EndpointError, RetryPolicy, api_key, get_json, post_json

KEY_ENV = ("EVAL_API_KEY", "OPENAI_API_KEY")


class OpenAIBackend:
    """Greedy chat completions from an OpenAI-compatible server; `complete` returns the answer texts."""

    has_audio = True  # the server decides; a text-only model answers its own error

    def __init__(self, endpoint: str, model: str, concurrency: int = 4, policy: RetryPolicy | None = None):
        self.base = endpoint.rstrip("/")
        self.model = model
        self.name = generator_name(None, "openai", model=model)
        self.concurrency = max(1, concurrency)
        self.policy = policy or RetryPolicy()
        self.key = api_key(*KEY_ENV)
        served = self._served_models()
        if model not in served:
            raise EndpointError(f"{self.base}: model {model!r} is not served (serves: {', '.join(served) or 'none'})")

    def _served_models(self) -> list[str]:
        try:
            body = get_json(f"{self.base}/models", self.policy, self.key)
        except EndpointError as e:
            raise EndpointError(f"{self.base}: not an OpenAI-compatible endpoint ({e})") from None
        try:
            data = json.loads(body)["data"]
            return [str(m["id"]) for m in data]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EndpointError(
                f"{self.base}/models: not an OpenAI-compatible model list ({type(e).__name__}: {e})"
            ) from None

    def complete(self, requests: Sequence[dict], max_new_tokens: int) -> list[str]:
        """The assistant text of every request, in order (requests run `concurrency` at a time)."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda r: self._complete_one(r, max_new_tokens), requests))

    def _complete_one(self, request: dict, max_new_tokens: int) -> str:
        payload = {**request, "model": self.model, "max_tokens": max_new_tokens, "temperature": 0.0}
        url = f"{self.base}/chat/completions"
        body = post_json(url, payload, self.policy, self.key)
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise EndpointError(f"{url}: not an OpenAI chat completion ({type(e).__name__}: {e})") from None
        if not isinstance(content, str):
            raise EndpointError(f"{url}: choices[0].message.content is not a string")
        return content
