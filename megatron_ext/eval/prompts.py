"""Benchmark samples -> OpenAI chat requests -> token prompts with mistral-common (the tokenizer every
checkpoint ships as tekken.json).

A sample first becomes an OpenAI chat-completions body (`chat_request`: `text` and `input_audio` parts,
base64 WAV, the format vLLM's Voxtral serves); the in-process backends and `cli/serve.py` turn that same
body into tokens (`prompt_from_request`), so a served checkpoint sees exactly the in-process prompt.
Audio prompts follow Voxtral's chat format (`[INST][BEGIN_AUDIO][AUDIO]x375 per 30 s...[/INST]`) and
ASR uses its transcription format (`...[/INST]lang:en[TRANSCRIBE]`), asked for by the extra body field
`transcription_language` (one audio part, no text); mistral-common pads audio to 30 s chunks and counts
the [AUDIO] tokens, so prompts match what the parent models were trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import AudioChunk, RawAudio, TextChunk
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.transcription.request import TranscriptionRequest
from mistral_common.tokens.tokenizers.audio import Audio
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from pydantic import ValidationError

from megatron_ext.audio.waveform import SAMPLE_RATE
from megatron_ext.checkpoint.megatron_lm import resolve
from megatron_ext.eval.benchmarks import Benchmark, Sample, mcq_text
from megatron_ext.tokenizer.loading import load_tekken


@dataclass(frozen=True)
class Prompt:
    """Token ids plus the audio clips (16 kHz, padded to 30 s multiples) whose embeddings replace its
    [AUDIO] tokens, in order."""

    tokens: list[int]
    audio: list[np.ndarray]


def load_tokenizer(checkpoint: str | Path) -> MistralTokenizer:
    """The checkpoint's own Tekken tokenizer (`tekken.json` beside the weights)."""
    path = resolve(Path(checkpoint)) / "tekken.json"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no tekken.json (every checkpoint carries its tokenizer)")
    return load_tekken(path)


def build_prompt(tokenizer: MistralTokenizer, bench: Benchmark, sample: Sample) -> Prompt:
    """The prompt a benchmark sends for one sample."""
    return prompt_from_request(tokenizer, chat_request(bench, sample))


def chat_request(bench: Benchmark, sample: Sample) -> dict:
    """The OpenAI chat-completions body (without model and limits) of one sample."""
    content: list[dict] = []
    if bench.needs_audio:
        audio = RawAudio.from_audio(Audio(sample.audio(), SAMPLE_RATE, format="wav"))
        content.append({"type": "input_audio", "input_audio": {"data": audio.data, "format": audio.format}})
    if bench.kind == "mcq":
        content.append({"type": "text", "text": mcq_text(sample, with_question=not bench.needs_audio)})
    elif (
        bench.kind != "asr"
        and sample.fields.get("instruction")
        and not (bench.kind == "toolcall" and bench.needs_audio)
    ):
        content.append({"type": "text", "text": sample.fields["instruction"]})  # a spoken tool call: audio only
    body: dict = {"messages": [{"role": "user", "content": content}]}
    if bench.kind == "toolcall":
        body["tools"] = sample.fields["tools"]
    if bench.kind == "asr":
        body["transcription_language"] = "en"
    return body


def prompt_from_request(tokenizer: MistralTokenizer, body: dict) -> Prompt:
    """Tokens and audio of a chat-completions body: one user message of `text`/`input_audio` parts (a string
    content is one text part); with `transcription_language`, exactly one audio part (Voxtral's ASR format).
    A conversation (system/user/assistant/tool messages, assistant `tool_calls`) or a request with `tools` is
    rendered by mistral-common's OpenAI reader and the checkpoint's chat template ([AVAILABLE_TOOLS] ...)."""
    messages = body.get("messages")
    tools = body.get("tools")
    if isinstance(messages, list) and body.get("transcription_language") is None and (len(messages) > 1 or tools):
        return _conversation_prompt(tokenizer, messages, tools)
    if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict):
        raise ValueError("messages: expected a list of one user message")
    if messages[0].get("role") != "user":
        raise ValueError(f"messages[0].role: expected 'user', got {messages[0].get('role')!r}")
    content = messages[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list) or not parts:
        raise ValueError("messages[0].content: expected a string or a non-empty list of parts")
    chunks = [_chunk(part, i) for i, part in enumerate(parts)]
    language = body.get("transcription_language")
    if language is not None:
        if len(chunks) != 1 or not isinstance(chunks[0], AudioChunk):
            raise ValueError("transcription_language needs exactly one input_audio part and no text")
        request = TranscriptionRequest(model="eval", audio=chunks[0].input_audio, language=str(language))
        encoded = tokenizer.encode_transcription(request)
    else:
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise ValueError("tools: expected a list of function schemas")
        try:
            request = ChatCompletionRequest(messages=[UserMessage(content=chunks)], tools=tools)
        except ValidationError as e:
            raise ValueError(f"tools: not a list of function schemas ({e.error_count()} error(s))") from None
        encoded = tokenizer.encode_chat_completion(request)
    return Prompt(list(encoded.tokens), [a.audio_array for a in encoded.audios])


def _conversation_prompt(tokenizer: MistralTokenizer, messages: list, tools: object) -> Prompt:
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError("tools: expected a list of {type: function, function: {name, description, parameters}}")
    try:
        request = ChatCompletionRequest.from_openai(messages, tools=tools or None)
        encoded = tokenizer.encode_chat_completion(request)
    except (ValueError, TypeError, KeyError, AttributeError, MistralCommonException) as e:
        raise ValueError(
            f"messages/tools: not a chat this model's template renders ({type(e).__name__}: {e})"
        ) from None
    return Prompt(list(encoded.tokens), [a.audio_array for a in encoded.audios])


def _chunk(part: object, index: int) -> TextChunk | AudioChunk:
    where = f"messages[0].content[{index}]"
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return TextChunk(text=part["text"])
    audio = part.get("input_audio") if kind == "input_audio" else None
    if isinstance(audio, dict) and isinstance(audio.get("data"), str) and audio.get("format") in ("wav", "mp3", "flac"):
        return AudioChunk(input_audio=RawAudio(data=audio["data"], format=audio["format"]))
    raise ValueError(f"{where}: expected {{type: text, text}} or {{type: input_audio, input_audio: {{data, format}}}}")
