"""Tool-call exact match: parse the call a model wrote in Mistral's tool-call format and compare it with the
expected one (function name and arguments, compared as JSON values).

Two spellings are read, the ones mistral-common renders for assistant tool calls (decoded with special
tokens kept): Tekken v11+ `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}` ([CALL_ID] optional) and older
`[TOOL_CALLS][{"name": ..., "arguments": {...}}]`. Only the first call counts; text before [TOOL_CALLS] and
a closing `</s>` are ignored. Anything else is "malformed" and scores 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

TOOL_CALLS, CALL_ID, ARGS, EOS = "[TOOL_CALLS]", "[CALL_ID]", "[ARGS]", "</s>"


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: function name and its arguments object."""

    name: str
    arguments: dict


def parse_tool_call(text: str) -> ToolCall | None:
    """The first tool call in a decoded model output, or None when there is none or it is malformed."""
    if TOOL_CALLS not in text:
        return None
    body = text.split(TOOL_CALLS, 1)[1].split(EOS, 1)[0].split(TOOL_CALLS, 1)[0].strip()
    if ARGS in body:
        name, arguments = body.split(ARGS, 1)
        name = name.split(CALL_ID, 1)[0].strip()
        return _call(name, _json(arguments))
    calls = _json(body)
    if isinstance(calls, list) and calls and isinstance(calls[0], dict):
        return _call(calls[0].get("name"), calls[0].get("arguments"))
    return None


def score_tool_call(prediction: str, answer: dict) -> dict:
    """Per-sample fields: `correct` (name and arguments equal), `name_correct` and `parsed` (well formed)."""
    call = parse_tool_call(prediction)
    expected = expected_call(answer)
    name_correct = call is not None and call.name == expected.name
    return {
        "parsed": call is not None,
        "name_correct": name_correct,
        "correct": name_correct and call.arguments == expected.arguments,
    }


def expected_call(answer: object) -> ToolCall:
    """The gold call of a sample's `answer` field ({"name", "arguments"}; arguments may be a JSON string)."""
    call = _call(answer.get("name"), answer.get("arguments")) if isinstance(answer, dict) else None
    if call is None:
        raise ValueError('field \'answer\' must be {"name": str, "arguments": object}')
    return call


def _call(name: object, arguments: object) -> ToolCall | None:
    if isinstance(arguments, str):
        arguments = _json(arguments)
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ToolCall(name, arguments)


def _json(text: str) -> object:
    """A JSON value, or None when the text is not one (a truncated generation, stray words)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
