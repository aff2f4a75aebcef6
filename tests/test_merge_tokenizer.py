"""Tokenizer alignment: categories, slot rule, merged tekken.json in mistral-common (audio + tool calls), refusals."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from megatron_ext.tokenizer.align import AlignmentError, TokenizerAlignment, align_tokenizers, write_alignment
from megatron_ext.tokenizer.tekken_builder import build_tekken, special_token_list, write_tekken

ROOT = Path(__file__).resolve().parents[1]


def _mistral_tokenizer(path: Path):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(path))


@pytest.fixture(scope="module")
def merged(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TokenizerAlignment, Path]:
    out = tmp_path_factory.mktemp("align")
    return write_alignment(tiny_dir / "devstral-hf/tekken.json", tiny_dir / "voxtral-hf/tekken.json", out), out


def test_categories_and_map(merged: tuple[TokenizerAlignment, Path]) -> None:
    alignment, out = merged
    assert alignment.voxtral_only == ["[AUDIO]", "[BEGIN_AUDIO]", "[TRANSCRIBE]"]
    assert alignment.devstral_only == ["[ARGS]", "[CALL_ID]"]
    assert len(alignment.common) == 20 and "[TOOL_CALLS]" in alignment.common
    # Voxtral's audio ranks are placeholders in Devstral: they keep their rank (rule: own rank first).
    assert {alignment.voxtral_to_merged[r] for r in (24, 25, 34)} == {24, 25, 34}
    assert all(alignment.voxtral_to_merged[r] == r for r in range(20))
    saved = TokenizerAlignment.load(out / "tokenizer_map.json")
    assert saved == alignment and saved.sha256() == alignment.sha256()


def test_merged_tokenizer_encodes_audio_chat_and_tool_calls(merged: tuple[TokenizerAlignment, Path]) -> None:
    from mistral_common.audio import Audio
    from mistral_common.protocol.instruct.chunk import AudioChunk, TextChunk
    from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    _, out = merged
    tok = _mistral_tokenizer(out / "tekken.json")
    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.random.default_rng(0).standard_normal(16000 * 5)).astype(np.float32), 16000, format="WAV")
    audio = Audio.from_base64(base64.b64encode(buf.getvalue()).decode())
    req = ChatCompletionRequest(
        messages=[UserMessage(content=[AudioChunk.from_audio(audio), TextChunk(text="fix it")])]
    )
    tokens = tok.encode_chat_completion(req).tokens
    assert tokens[:4] == [1, 3, 25, 24] and tokens.count(24) == 375

    tools = [
        Tool(
            function=Function(
                name="run",
                description="run a shell command",
                parameters={"type": "object", "properties": {"cmd": {"type": "string"}}},
            )
        )
    ]
    call = ToolCall(id="abcdefghi", function=FunctionCall(name="run", arguments='{"cmd": "ls"}'))
    req = ChatCompletionRequest(
        tools=tools,
        messages=[
            UserMessage(content="list files"),
            AssistantMessage(tool_calls=[call]),
            ToolMessage(tool_call_id="abcdefghi", name="run", content="a.py"),
        ],
    )
    tokens = tok.encode_chat_completion(req).tokens
    assert 9 in tokens and 32 in tokens and 33 in tokens  # [TOOL_CALLS] [ARGS] [CALL_ID] (v11 format)


def test_displaced_special_goes_to_lowest_free_placeholder(tiny_dir: Path, tmp_path: Path) -> None:
    dev = json.loads((tiny_dir / "devstral-hf/tekken.json").read_text())
    specials = {t["rank"]: t["token_str"] for t in dev["special_tokens"] if not t["token_str"].startswith("<SPECIAL_")}
    specials[24] = "[DEV_TOKEN]"  # Devstral now uses Voxtral's [AUDIO] rank
    dev["special_tokens"] = special_token_list(specials)
    write_tekken(dev, tmp_path / "tekken.json")
    alignment, _ = align_tokenizers(tmp_path / "tekken.json", tiny_dir / "voxtral-hf/tekken.json")
    assert alignment.voxtral_to_merged[24] == 20  # lowest free placeholder
    assert alignment.voxtral_to_merged[25] == 25 and alignment.voxtral_to_merged[34] == 34


def test_refuses_when_placeholders_run_out(tiny_dir: Path, tmp_path: Path) -> None:
    dev = json.loads((tiny_dir / "devstral-hf/tekken.json").read_text())
    dev["special_tokens"] = special_token_list({r: f"[T{r}]" for r in range(1000)})
    write_tekken(dev, tmp_path / "tekken.json")
    with pytest.raises(AlignmentError, match=r"no placeholder slot left.*\[AUDIO\], \[BEGIN_AUDIO\], \[TRANSCRIBE\]"):
        align_tokenizers(tmp_path / "tekken.json", tiny_dir / "voxtral-hf/tekken.json")


def test_refuses_different_regular_vocab(tiny_dir: Path, tmp_path: Path) -> None:
    from megatron_ext.tokenizer.tekken_builder import devstral_spec

    write_tekken(build_tekken(devstral_spec(2049)), tmp_path / "tekken.json")
    with pytest.raises(AlignmentError, match="num_vocab_tokens differs"):
        align_tokenizers(tmp_path / "tekken.json", tiny_dir / "voxtral-hf/tekken.json")
    dev = json.loads((tiny_dir / "devstral-hf/tekken.json").read_text())
    dev["vocab"][7]["token_bytes"] = dev["vocab"][8]["token_bytes"]
    write_tekken(dev, tmp_path / "tekken.json")
    with pytest.raises(AlignmentError, match=r"regular vocabulary differs .* first: \[7\]"):
        align_tokenizers(tmp_path / "tekken.json", tiny_dir / "voxtral-hf/tekken.json")


def test_refuses_swapped_or_wrong_parent_tokenizers(tiny_dir: Path) -> None:
    dev, vox = tiny_dir / "devstral-hf/tekken.json", tiny_dir / "voxtral-hf/tekken.json"
    with pytest.raises(
        AlignmentError, match=r"tokenizers look swapped: .*voxtral-hf/tekken.json \(given for Devstral\)"
    ):
        align_tokenizers(vox, dev)
    with pytest.raises(AlignmentError, match=r"devstral-hf/tekken.json: no \[AUDIO\] special token: not a Voxtral"):
        align_tokenizers(dev, dev)


def test_cli_one_line_error(tiny_dir: Path, tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            ROOT / "tools/align_tokenizer.py",
            "--devstral",
            tmp_path / "nope.json",
            "--voxtral",
            tiny_dir / "voxtral-hf",
            "--output",
            tmp_path / "o",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and res.stderr.strip().count("\n") == 0 and "nope.json" in res.stderr


def test_unreadable_tokenizer_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    raw = (tiny_dir / "devstral-hf/tekken.json").read_bytes()
    (tmp_path / "tekken.json").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AlignmentError, match=rf"^{re.escape(str(tmp_path / 'tekken.json'))}: cannot read tokenizer: "):
        align_tokenizers(tmp_path / "tekken.json", tiny_dir / "voxtral-hf/tekken.json")


@pytest.mark.parametrize("damage", ["truncated", "not-an-object", "missing"])
def test_every_tokenizer_reader_names_a_bad_file(tiny_dir: Path, tmp_path: Path, damage: str) -> None:
    """Training, evaluation and the model's token lookup all read tekken.json through one loader."""
    from megatron_ext.data.chat import load_tokenizer as training_tokenizer
    from megatron_ext.eval.prompts import load_tokenizer as eval_tokenizer
    from megatron_ext.models.tokens import audio_token_id
    from megatron_ext.tokenizer.loading import TokenizerFileError

    raw = (tiny_dir / "voxtral-hf/tekken.json").read_bytes()
    path = tmp_path / "tekken.json"
    if damage != "missing":
        path.write_bytes(raw[: len(raw) // 3] if damage == "truncated" else b"[1, 2]")
    expected = (FileNotFoundError, TokenizerFileError) if damage == "missing" else TokenizerFileError
    for read in (training_tokenizer, eval_tokenizer, audio_token_id):
        with pytest.raises(expected, match=re.escape(str(tmp_path))) as info:
            read(tmp_path if read is eval_tokenizer else path)
        assert "\n" not in str(info.value)
    assert audio_token_id(tiny_dir / "voxtral-hf/tekken.json") == 24


def test_written_tokenizer_is_compact_utf8_json(tiny_dir: Path, tmp_path: Path) -> None:
    """write_tekken gives json.dumps(ensure_ascii=False, separators=(",", ":"))'s bytes (non-ASCII and
    control characters, floats and nesting included)."""
    data = json.loads((tiny_dir / "voxtral-hf/tekken.json").read_text())
    data["extra"] = {'é\u2028\x1f"\\/': [0.1, -2.5e-30, 1e300, 7, None, True, "\t\n"]}
    write_tekken(data, tmp_path / "tekken.json")
    expected = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    assert (tmp_path / "tekken.json").read_bytes() == expected
