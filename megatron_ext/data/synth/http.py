"""JSON-over-HTTP POST with timeouts and exponential backoff, shared by the judge and TTS clients."""

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from megatron_ext.data.synth.errors import EndpointError

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RetryPolicy:
    """How long one request may take and how often a failed one is retried."""

    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 0.5


def api_key(*env_names: str) -> str | None:
    """The first non-empty API key among these environment variables (never logged)."""
    return next((os.environ[n] for n in env_names if os.environ.get(n)), None)


def post_json(url: str, payload: dict, policy: RetryPolicy, key: str | None = None) -> bytes:
    """POST `payload` as JSON and return the response body; retry timeouts, connection errors and 5xx/429."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = json.dumps(payload).encode()
    last = ""
    for attempt in range(policy.retries + 1):
        if attempt:
            time.sleep(policy.backoff_s * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
            if e.code not in RETRYABLE_STATUS:
                break
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            last = "timeout" if isinstance(reason, TimeoutError) else f"{type(e).__name__}: {reason}"
    raise EndpointError(f"POST {url} failed after {attempt + 1} attempt(s): {last}")
