"""The library's one HTTP client (httpx2), for the OpenAI-compatible endpoints it calls: the synth judge and
TTS and the evaluation judge. JSON POST with timeouts and exponential backoff; API keys come from the
environment and are never logged; `$OPENAI_BASE_URL` is the default endpoint, as in the openai SDK.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import httpx2

from megatron_ext.errors import ProjectError

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class EndpointError(ProjectError, OSError):
    """An endpoint kept failing after every retry, or answered something unusable (message: one line)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long one request may take and how often a failed one is retried."""

    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 0.5


def api_key(*env_names: str) -> str | None:
    """The first non-empty API key among these environment variables (never logged)."""
    return next((os.environ[n] for n in env_names if os.environ.get(n)), None)


def endpoint_url(url: str | None, model: str | None) -> str | None:
    """Base URL of the endpoint serving `model`: `url` when given, else `$OPENAI_BASE_URL` when a model is
    named, else None (no endpoint configured: the caller uses its offline path)."""
    if url:
        return url
    return (os.environ.get("OPENAI_BASE_URL") or None) if model else None


def post_json(url: str, payload: dict, policy: RetryPolicy, key: str | None = None) -> bytes:
    """POST `payload` as JSON and return the response body; retry timeouts, connection errors and 5xx/429."""
    return _request("POST", url, policy, key, payload)


def get_json(url: str, policy: RetryPolicy, key: str | None = None) -> bytes:
    """GET `url` and return the response body, retried like `post_json`."""
    return _request("GET", url, policy, key)


def _request(method: str, url: str, policy: RetryPolicy, key: str | None, payload: dict | None = None) -> bytes:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    last = ""
    for attempt in range(policy.retries + 1):
        if attempt:
            time.sleep(policy.backoff_s * 2 ** (attempt - 1))
        try:
            response = httpx2.request(method, url, json=payload, headers=headers, timeout=policy.timeout_s)
        except httpx2.TimeoutException:
            last = "timeout"
            continue
        except httpx2.TransportError as e:
            last = f"{type(e).__name__}: {e}"
            continue
        if response.is_success:
            return response.content
        last = f"HTTP {response.status_code}"
        if response.status_code not in RETRYABLE_STATUS:
            break
    raise EndpointError(f"{method} {url} failed after {attempt + 1} attempt(s): {last}")
