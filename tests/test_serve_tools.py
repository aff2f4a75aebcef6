"""Tool calls through `tools/serve.py`: requests with `tools` are rendered by the checkpoint's chat template,
and Mistral's tool-call output comes back as OpenAI `tool_calls`.

The parser is checked on what mistral-common's template encodes for assistant tool calls (tokenizer v11,
`[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`, the tiny Devstral's; v7, one JSON list, the tiny Voxtral's). The
server is checked end to end on a real checkpoint that emits a tool call: the tiny Devstral with every
attention and MLP output projection zeroed (each position's logits then depend on its own token only) and an
LM head that maps [/INST] -> [TOOL_CALLS] -> get_time -> [ARGS] -> {} -> </s>, token by token.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from safetensors.torch import load_file, save_file

from megatron_ext.cli.serve import main as serve_main
from megatron_ext.eval.identity import served_name
from megatron_ext.eval.prompts import load_tokenizer
from megatron_ext.eval.tool_calls import split_tool_calls

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} tool",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    for name in ("get_time", "get_weather")
]
CALLS = [
    {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "jklmnopqr", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
]


def _conversation(calls: list[dict]) -> list[dict]:
    """A harness-like chat: system, user, assistant tool calls, their results, user."""
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "sunny"} for c in calls]
    return [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        *results,
        {"role": "user", "content": "Thanks. Once more?"},
    ]


@pytest.mark.parametrize("parent", ["devstral-hf", "voxtral-hf"])
def test_tool_calls_parse_what_the_template_encodes(tiny_dir, parent):
    tokenizer = load_tokenizer(tiny_dir / parent)
    raw = tokenizer.instruct_tokenizer.tokenizer
    tokens = tokenizer.encode_chat_completion(ChatCompletionRequest.from_openai(_conversation(CALLS), TOOLS)).tokens
    start = tokens.index(raw.get_special_token("[TOOL_CALLS]"))
    emitted = tokens[start : tokens.index(raw.eos_id, start)]  # what the model generates, EOS not included
    content, calls = split_tool_calls(tokenizer, emitted)
    assert content == "" and calls == CALLS
    said = raw.encode("Let me check.", bos=False, eos=False)
    content, calls = split_tool_calls(tokenizer, said + emitted)
    assert content == "Let me check." and calls == CALLS
    broken = emitted[: len(emitted) - 2]  # cut inside the JSON arguments: not a tool call
    assert split_tool_calls(tokenizer, broken) == (tokenizer.decode(broken), [])
    assert split_tool_calls(tokenizer, said) == ("Let me check.", [])


def _tool_calling_checkpoint(source: Path, out: Path) -> list[int]:
    """Copy of the tiny Devstral whose greedy reply to any chat is `[TOOL_CALLS]get_time[ARGS]{}`; the chain."""
    shutil.copytree(source, out)
    raw = load_tokenizer(source).instruct_tokenizer.tokenizer
    chain = [raw.get_special_token("[/INST]"), raw.get_special_token("[TOOL_CALLS]")]
    chain += raw.encode("get_time", bos=False, eos=False) + [raw.get_special_token("[ARGS]")]
    chain += raw.encode("{}", bos=False, eos=False) + [raw.eos_id]
    assert len(set(chain)) == len(chain)  # one successor per token
    weights = load_file(out / "model.safetensors")
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])  # the residual stream stays the token's embedding
    head = torch.zeros_like(weights["lm_head.weight"])
    for token, successor in zip(chain, chain[1:], strict=False):
        direction = weights["model.norm.weight"] * weights["model.embed_tokens.weight"][token]
        head[successor] = 10 * direction / direction.norm()
    weights["lm_head.weight"] = head
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return chain


@pytest.fixture(scope="module")
def tool_server(tiny_dir, tmp_path_factory) -> Iterator[tuple[str, str, Path]]:
    """`tools/serve.py` serving the tool-calling checkpoint: (base URL, served name, checkpoint)."""
    checkpoint = tmp_path_factory.mktemp("tools") / "caller"
    _tool_calling_checkpoint(tiny_dir / "devstral-hf", checkpoint)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools/serve.py"), "--checkpoint", str(checkpoint), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        model = served_name(checkpoint)
        assert line.startswith(f"serving {model} at http://127.0.0.1:"), line
        yield line.split(" at ", 1)[1].strip(), model, checkpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_server_returns_openai_tool_calls(tool_server, capsys):
    url, model, checkpoint = tool_server
    assert serve_main(["--checkpoint", str(checkpoint), "--print-name"]) == 0  # what to give vLLM, nothing loaded
    assert capsys.readouterr().out == f"{model}\n"
    assert model.startswith("caller@") and httpx2.get(f"{url}/models", timeout=30).json()["data"][0]["id"] == model
    body = {"model": model, "messages": _conversation(CALLS), "tools": TOOLS, "max_tokens": 16}
    answer = httpx2.post(f"{url}/chat/completions", json=body, timeout=60).json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"] == {"name": "get_time", "arguments": "{}"}
    assert len(call["id"]) == 9 and call["id"].isalnum()
    # the prompt is the chat template's rendering of the whole conversation with its tools
    expected = load_tokenizer(checkpoint).encode_chat_completion(
        ChatCompletionRequest.from_openai(body["messages"], TOOLS)
    )
    assert answer["usage"]["prompt_tokens"] == len(expected.tokens)
    # without tools the same output is plain text (special tokens dropped), as for benchmarks
    plain = {"model": model, "messages": [{"role": "user", "content": "What time is it?"}], "max_tokens": 16}
    choice = httpx2.post(f"{url}/chat/completions", json=plain, timeout=60).json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "get_time{}"} and choice["finish_reason"] == "stop"
    bad = {"model": model, "messages": _conversation(CALLS), "tools": "get_time"}
    answer = httpx2.post(f"{url}/chat/completions", json=bad, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["message"].startswith("tools: expected a list")
