"""Generated tokens -> assistant text plus OpenAI `tool_calls`, for Mistral's tool-call formats.

What the model emits after `[TOOL_CALLS]` depends on its tokenizer version (mistral-common encodes
assistant tool calls the same way):
- v2..v7 (e.g. Voxtral): `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id"?: ...}, ...]` (one JSON list);
- v11+ (Devstral): `[TOOL_CALLS]name[ARGS]{...}` per call, `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}` with ids.
Text before the first `[TOOL_CALLS]` is the message content. Output that does not parse as tool calls is
returned as plain text (as vLLM's Mistral parser does), so a harness sees what the model said.
"""

from __future__ import annotations

import json
import uuid

from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"


def split_tool_calls(tokenizer: MistralTokenizer, tokens: list[int]) -> tuple[str, list[dict]]:
    """(content, OpenAI tool_calls) of generated tokens; no tool calls when there are none or they do not parse."""
    raw = tokenizer.instruct_tokenizer.tokenizer
    marker = _special(raw, TOOL_CALLS)
    if marker is None or marker not in tokens:
        return tokenizer.decode(tokens), []
    start = tokens.index(marker)
    segments, current = [], []
    for token in tokens[start + 1 :]:
        if token == marker:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    try:
        calls = [call for segment in segments for call in _calls(raw, segment)]
    except (ValueError, TypeError, KeyError):
        return tokenizer.decode(tokens), []
    return tokenizer.decode(tokens[:start]), calls


def _calls(raw, segment: list[int]) -> list[dict]:
    """The tool calls of one `[TOOL_CALLS]` segment, in OpenAI form."""
    text = lambda ids: raw.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)  # noqa: E731
    if raw.version <= TokenizerVersion.v7:
        listed = json.loads(text(segment))
        if not isinstance(listed, list):
            raise ValueError("tool calls: expected a JSON list")
        return [_openai_call(c["name"], c["arguments"], c.get("id")) for c in listed]
    args = _special(raw, ARGS)
    if segment.count(args) != 1:
        raise ValueError("tool call: expected one [ARGS]")
    head, body = segment[: segment.index(args)], segment[segment.index(args) + 1 :]
    call_id = _special(raw, CALL_ID)
    name, ident = head, None
    if call_id is not None and call_id in head:
        name, ident = head[: head.index(call_id)], text(head[head.index(call_id) + 1 :])
    return [_openai_call(text(name), json.loads(text(body)), ident)]


def _openai_call(name: object, arguments: object, ident: object) -> dict:
    if not isinstance(name, str) or not name.strip() or not isinstance(arguments, dict):
        raise ValueError("tool call: expected a name and a JSON object of arguments")
    ident = ident if isinstance(ident, str) and ident else uuid.uuid4().hex[:9]  # Mistral ids: 9 alphanumerics
    return {"id": ident, "type": "function", "function": {"name": name.strip(), "arguments": json.dumps(arguments)}}


def _special(raw, token: str) -> int | None:
    try:
        return raw.get_special_token(token)
    except ValueError:  # not in this tokenizer's vocabulary
        return None
