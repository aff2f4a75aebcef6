"""Input rows: OpenAI chat-format coding trajectories, validated with errors that name row and field.

A row is a JSON object with `messages` (roles system / user / assistant / tool; assistant turns may carry
`tool_calls`) and optional `tools`; other keys are carried through untouched. Only user turns whose
content is a non-empty string of at most `max_chars` characters are candidates for speech.
"""

import base64
import json

from megatron_ext.data.synth.errors import InputError

ROLES = {"system", "user", "assistant", "tool", "developer"}
RESERVED_KEY = "synth"


def parse_row(line: str, path: str, row: int) -> dict:
    """The row as a dict, or InputError naming `path:row: field` for structural problems."""
    if not line.strip():
        raise InputError(path, row, "line", "empty line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(path, row, "json", f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(path, row, "json", f"expected an object, got {type(obj).__name__}")
    if RESERVED_KEY in obj:
        raise InputError(path, row, RESERVED_KEY, "key is reserved for pipeline metadata")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError(path, row, "messages", "missing or empty list")
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InputError(path, row, field, f"expected an object, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise InputError(path, row, f"{field}.role", f"missing or unknown role {message.get('role')!r}")
        content = message.get("content")
        if not (content is None or isinstance(content, (str, list))):
            raise InputError(
                path, row, f"{field}.content", f"expected a string or content parts, got {type(content).__name__}"
            )
    if "tools" in obj and not isinstance(obj["tools"], list):
        raise InputError(path, row, "tools", f"expected a list, got {type(obj['tools']).__name__}")
    return obj


def speech_candidates(obj: dict, max_chars: int) -> tuple[list[int], list[dict]]:
    """Indices of user turns to judge, and one skip record per user turn kept as it is."""
    candidates, skipped = [], []
    for i, message in enumerate(obj["messages"]):
        if message["role"] != "user":
            continue
        content = message.get("content")
        if not isinstance(content, str):
            reason = "non-string content"
        elif not content.strip():
            reason = "empty content"
        elif len(content) > max_chars:
            reason = "too long"
        else:
            candidates.append(i)
            continue
        turn = {"message": i, "skipped": reason}
        if reason == "too long":
            turn["chars"] = len(content)
        skipped.append(turn)
    return candidates, skipped


def audio_turn(wav: bytes, transcription: str) -> dict:
    """A user turn holding speech: one `input_audio` part (base64 WAV) plus its `transcription`."""
    data = base64.b64encode(wav).decode("ascii")
    return {
        "role": "user",
        "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}],
        "transcription": transcription,
    }
