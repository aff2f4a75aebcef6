"""Held-out scores of the miniature's parents: typed tool-call exact match, and WER / spoken QA through the
project's evaluation runner (eval/runner.py on the librispeech and llama_questions formats).

A tool call is read back from the generated text in either parent's format: Tekken v11 (Devstral:
`[TOOL_CALLS]name[CALL_ID]id[ARGS]{json}`) or v7 (Voxtral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}]`).
Exact match: the same function name and the same arguments (as parsed JSON).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

from megatron_ext.eval.generation import load_generator
from megatron_ext.eval.prompts import Prompt, load_tokenizer
from megatron_ext.eval.runner import evaluate

_V11_CALL = re.compile(r"\[TOOL_CALLS\](?P<name>[^\[]+)(?:\[CALL_ID\][^\[]*)?\[ARGS\](?P<args>.*)", re.S)


def parse_tool_call(text: str) -> dict[str, Any] | None:
    """{"name", "arguments"} of the first tool call in `text` (special tokens kept), or None when there is none
    or it does not parse."""
    if "[TOOL_CALLS]" not in text:
        return None
    text = text.split("</s>")[0]
    m = _V11_CALL.search(text)
    try:
        if m:
            return {"name": m.group("name").strip(), "arguments": json.loads(m.group("args").strip())}
        calls = json.loads(text.split("[TOOL_CALLS]", 1)[1].strip())
        call = calls[0] if isinstance(calls, list) else calls
        return {"name": call["name"], "arguments": call["arguments"]}
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        return None


def tool_call_exact_match(
    checkpoint: Path, records: list[dict[str, Any]], batch_size: int = 32, max_new_tokens: int = 48
) -> tuple[float, list[dict[str, Any]]]:
    """Share of `records` (tasks.py tool-call records) whose greedy answer is exactly the expected call, and the
    per-record predictions."""
    tokenizer = load_tokenizer(checkpoint)
    generator = load_generator(checkpoint, backend="hf")
    rows = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        prompts = []
        for r in batch:
            request = ChatCompletionRequest.from_openai(
                [{"role": "user", "content": r["instruction"]}], tools=r["tools"]
            )
            prompts.append(Prompt(list(tokenizer.encode_chat_completion(request).tokens), []))
        for r, out in zip(batch, generator.generate(prompts, max_new_tokens), strict=True):
            text = tokenizer.instruct_tokenizer.tokenizer.decode(out, special_token_policy=SpecialTokenPolicy.KEEP)
            call = parse_tool_call(text)
            rows.append({"id": r["id"], "prediction": text, "correct": call == r["answer"]})
    return sum(r["correct"] for r in rows) / max(len(rows), 1), rows


def speech_scores(checkpoint: Path, asr: Path, qa: Path, results: Path) -> dict[str, float]:
    """Held-out WER (librispeech format) and spoken-QA accuracy (llama_questions format) of an audio model."""
    wer = evaluate("librispeech", checkpoint, asr, results, backend="hf", batch_size=20, max_new_tokens=32)
    answers = evaluate("llama_questions", checkpoint, qa, results, backend="hf", batch_size=20, max_new_tokens=8)
    return {"wer": wer.value, "spoken_qa_accuracy": answers.value}
