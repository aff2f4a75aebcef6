"""Optional LLM judge for spoken QA: is a free-form answer correct given the acceptable answers?

Talks to an OpenAI-compatible `/chat/completions` endpoint with JSON-schema output, through the library's
HTTP client (timeouts, retries, API key from the environment, never logged).
"""

from __future__ import annotations

import json

from megatron_ext.http_client import EndpointError, RetryPolicy, api_key, endpoint_url, post_json

PROMPT = """You grade answers to spoken trivia questions. Given the question, the list of acceptable \
answers and a model's answer, decide whether the model's answer gives one of the acceptable answers \
(paraphrases, spelling variants and extra explanation are fine; hedging between several answers is not)."""

RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "grade",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"correct": {"type": "boolean"}},
            "required": ["correct"],
            "additionalProperties": False,
        },
    },
}


class AnswerJudge:
    """Grades one answer per request; a judge failure raises (a score must never be silently guessed)."""

    def __init__(self, base_url: str, model: str, policy: RetryPolicy | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.policy = policy or RetryPolicy()
        self._key = api_key("JUDGE_API_KEY", "OPENAI_API_KEY")

    def correct(self, question: str, answers: list[str], prediction: str) -> bool:
        content = json.dumps({"question": question, "acceptable_answers": answers, "model_answer": prediction})
        payload = {
            "model": self.model,
            "messages": [{"role": "system", "content": PROMPT}, {"role": "user", "content": content}],
            "response_format": RESPONSE_FORMAT,
            "temperature": 0.0,
        }
        body = post_json(self.url, payload, self.policy, self._key)
        try:
            verdict = json.loads(json.loads(body)["choices"][0]["message"]["content"])["correct"]
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
            raise EndpointError(
                f"{self.url}: judge response does not follow the schema ({type(e).__name__}: {e})"
            ) from e
        if not isinstance(verdict, bool):
            raise EndpointError(f"{self.url}: judge returned correct={verdict!r}, not a boolean")
        return verdict


def make_answer_judge(url: str | None, model: str | None) -> AnswerJudge | None:
    """The judge at `url` (else at `$OPENAI_BASE_URL` when a model is named), or None: answer match."""
    endpoint = endpoint_url(url, model)
    return AnswerJudge(endpoint, model, RetryPolicy()) if endpoint and model else None
