"""Stage 1: judge each user message DIRECT / REWRITE / NO and produce its spoken text.

Two judges share one interface: `RuleJudge` (offline, `rules.py`) and `HttpJudge`, an OpenAI-compatible
chat-completions client using JSON-schema structured output (as served by vLLM).
"""

import json
import time
from dataclasses import asdict, dataclass
from typing import Protocol

from megatron_ext.data.synth import rules
from megatron_ext.http_client import EndpointError, RetryPolicy, api_key, post_json

DECISIONS = ("DIRECT", "REWRITE", "NO")

JUDGE_PROMPT = """You prepare user messages from coding-agent conversations to be read aloud by a \
text-to-speech system. Classify the message:
- DIRECT: it is already naturally speakable; spoken_text is the message unchanged.
- REWRITE: it becomes speakable by removing only syntactic formatting; spoken_text is that version.
- NO: it cannot be spoken faithfully (directory trees, file listings, long file paths, multi-line code, \
diffs, stack traces, HTML or markup-heavy text, non-English text); spoken_text is empty.
Rules for REWRITE: keep every requirement, constraint, code token, file path, number, parameter value and \
error message exactly as written. Remove only markdown syntax, bullet or numbering markers, extraneous \
whitespace and emoji. Turn enumerated lists into natural paragraph form. Do not add, drop or reorder content."""

RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "verbalizability",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "decision": {"type": "string", "enum": list(DECISIONS)},
                "spoken_text": {"type": "string"},
            },
            "required": ["decision", "spoken_text"],
            "additionalProperties": False,
        },
    },
}


@dataclass(frozen=True)
class Judgment:
    """One judge verdict; `error` is set (and the decision is NO) when the judge itself failed."""

    decision: str
    spoken_text: str
    model: str
    latency_s: float
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Judge(Protocol):
    """Anything that turns a user message into a `Judgment`."""

    model: str

    def judge(self, text: str) -> Judgment: ...


class RuleJudge:
    """Offline judge from deterministic rules; lets the pipeline run with no server."""

    model = "rules-v1"

    def judge(self, text: str) -> Judgment:
        start = time.perf_counter()
        decision, spoken = rules.classify(text)
        return Judgment(decision, spoken, self.model, round(time.perf_counter() - start, 6))


class HttpJudge:
    """Judge served by an OpenAI-compatible `/chat/completions` endpoint with `json_schema` output."""

    def __init__(self, base_url: str, model: str, policy: RetryPolicy):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.policy = policy
        self._key = api_key("JUDGE_API_KEY", "OPENAI_API_KEY")

    def judge(self, text: str) -> Judgment:
        start = time.perf_counter()
        payload = {
            "model": self.model,
            "messages": [{"role": "system", "content": JUDGE_PROMPT}, {"role": "user", "content": text}],
            "response_format": RESPONSE_FORMAT,
            "temperature": 0.0,
        }
        try:
            body = post_json(self.url, payload, self.policy, self._key)
            decision, spoken = _parse_verdict(body)
        except (EndpointError, ValueError) as e:
            return Judgment("NO", "", self.model, round(time.perf_counter() - start, 6), str(e))
        if decision == "DIRECT":
            spoken = text
        return Judgment(decision, spoken, self.model, round(time.perf_counter() - start, 6))


def _parse_verdict(body: bytes) -> tuple[str, str]:
    """(decision, spoken_text) from a chat-completions response; ValueError if it breaks the schema."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
        verdict = json.loads(content)
        decision, spoken = verdict["decision"], verdict["spoken_text"]
    except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"judge response does not follow the schema: {type(e).__name__}: {e}") from e
    if decision not in DECISIONS or not isinstance(spoken, str):
        raise ValueError(f"judge response does not follow the schema: decision={decision!r}")
    if decision != "NO" and not spoken.strip():
        raise ValueError(f"judge returned {decision} with empty spoken_text")
    return decision, spoken
