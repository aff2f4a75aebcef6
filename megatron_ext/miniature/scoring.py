"""Held-out scores of the miniature's parents: typed tool-call exact match, and WER / spoken QA through the
project's evaluation runner (eval/runner.py on the librispeech and llama_questions formats).

Tool calls are read back from the generated tokens by eval/tool_calls.py (either parent's format: Devstral's
v11 `[TOOL_CALLS]name[CALL_ID]id[ARGS]{json}`, Voxtral's v7 JSON list). Exact match: exactly one call, with
the expected function name and the same arguments (as parsed JSON).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from megatron_ext.eval.generation import load_generator
from megatron_ext.eval.prompts import Prompt, load_tokenizer
from megatron_ext.eval.runner import evaluate
from megatron_ext.eval.tool_calls import split_tool_calls


def parsed_call(tokenizer: MistralTokenizer, tokens: list[int]) -> dict[str, Any] | None:
    """{"name", "arguments"} of generated tokens holding exactly one tool call, else None."""
    _, calls = split_tool_calls(tokenizer, tokens)
    if len(calls) != 1:
        return None
    return {"name": calls[0]["function"]["name"], "arguments": json.loads(calls[0]["function"]["arguments"])}


def tool_call_exact_match(
    checkpoint: Path, records: list[dict[str, Any]], batch_size: int = 32, max_new_tokens: int = 32
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
            call = parsed_call(tokenizer, out)
            rows.append(
                {"id": r["id"], "prediction": tokenizer.decode(out), "call": call, "correct": call == r["answer"]}
            )
    return sum(r["correct"] for r in rows) / max(len(rows), 1), rows


def speech_scores(checkpoint: Path, asr: Path, qa: Path, results: Path) -> dict[str, float]:
    """Held-out WER (librispeech format) and spoken-QA accuracy (llama_questions format) of an audio model."""
    wer = evaluate("librispeech", checkpoint, asr, results, backend="hf", batch_size=20, max_new_tokens=32)
    answers = evaluate("llama_questions", checkpoint, qa, results, backend="hf", batch_size=20, max_new_tokens=8)
    return {"wer": wer.value, "spoken_qa_accuracy": answers.value}
