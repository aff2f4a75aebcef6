"""A small, seeded SFT set for the tiny models: coding-style tool-call chats and real spoken user turns.

Text chats follow the shape of agent trajectories (tools, an assistant tool call, a tool result, a
final answer). Audio chats carry real speech (Debian `pocketsphinx-testdata`: five short recordings of
card names with their transcripts) as OpenAI `input_audio` parts, the same format the synthetic-audio
pipeline writes. Used by `make sft` and the SFT tests; real runs point the config at real data.
"""

from __future__ import annotations

import base64
import json
import random
import re
from pathlib import Path

SPEECH_DIR = Path("/usr/share/pocketsphinx/test/data/cards")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file of the repository",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        },
    }
]
FILES = ["setup.py", "README.md", "src/app.py", "tests/test_app.py", "Makefile", "docs/index.md"]
LINES = ["import os", "# Project", "def main():", "import pytest", "all: build", "Welcome"]


def speech_clips(directory: Path = SPEECH_DIR) -> list[tuple[Path, str]]:
    """(wav, transcript) pairs of the pocketsphinx card recordings; FileNotFoundError if not installed."""
    table = directory / "cards.transcription"
    if not table.is_file():
        raise FileNotFoundError(f"{table}: missing (install the Debian package pocketsphinx-testdata)")
    clips = []
    for line in table.read_text().splitlines():
        m = re.match(r"<s>\s*(.*?)\s*</s>\s*\((\w+)\)", line)
        if m:
            clips.append((directory / f"{m.group(2)}.wav", m.group(1)))
    return clips


def text_chat(rng: random.Random, i: int) -> dict:
    k = rng.randrange(len(FILES))
    call_id = f"call_{i:04d}"  # OpenAI-style id; the encoder maps it to Tekken's 9-alphanumeric form
    return {
        "messages": [
            {"role": "user", "content": f"What is the first line of {FILES[k]}?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "read_file", "arguments": json.dumps({"path": FILES[k]})},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": LINES[k]},
            {"role": "assistant", "content": f"The first line of {FILES[k]} is `{LINES[k]}`."},
        ],
        "tools": TOOLS,
    }


def audio_chat(wav: Path, transcript: str) -> dict:
    data = base64.b64encode(wav.read_bytes()).decode("ascii")
    return {
        "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]},
            {"role": "assistant", "content": f"You said: {transcript}."},
        ]
    }


def write_tiny_chats(out: Path, n_text: int = 200, n_audio: int = 40, seed: int = 0) -> dict[str, Path]:
    """Write `text.jsonl` and `audio.jsonl` under `out` (atomically); returns their paths."""
    rng = random.Random(seed)
    clips = speech_clips()
    out.mkdir(parents=True, exist_ok=True)
    rows = {
        "text": [text_chat(rng, i) for i in range(n_text)],
        "audio": [audio_chat(*clips[i % len(clips)]) for i in range(n_audio)],
    }
    paths = {}
    for name, samples in rows.items():
        path = out / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(s) + "\n" for s in samples))
        tmp.replace(path)
        paths[name] = path
    return paths
