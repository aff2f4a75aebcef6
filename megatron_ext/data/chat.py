"""Chat samples -> Tekken tokens, assistant-only loss mask and 16 kHz audio, through mistral-common.

A sample is an OpenAI-style chat (`messages`, optional `tools`); user turns may carry `input_audio`
parts (base64 WAV). mistral-common parses it (`ChatCompletionRequest.from_openai`), validates it in
fine-tuning mode and encodes it; audio is resampled to 16 kHz and padded to whole 30 s chunks there,
and every chunk becomes `tokens_per_chunk` [AUDIO] tokens that the model replaces by projector outputs.
The loss mask covers exactly the tokens mistral-common emits for assistant messages (text, tool calls
and the closing </s>), located in the encoded stream message by message.

Two more sample kinds, for training from scratch (the miniature, README "Miniature"):
  - `{"text": str}`: a plain document, `<s>` text `</s>`, the loss on every token (pretraining);
  - `{"transcription": {"input_audio": {"data", "format"}, "language": "en", "text": str}}`: Voxtral's ASR
    format (`...[/INST]lang:en[TRANSCRIBE]`, as the evaluation prompts it), the loss on the transcript + `</s>`.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mistral_common.protocol.instruct.chunk import RawAudio
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.protocol.transcription.request import TranscriptionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from megatron_ext.errors import ProjectError
from megatron_ext.tokenizer.loading import load_tekken


class SampleError(ProjectError, ValueError):
    """A chat sample cannot be encoded (the message names the sample and the reason)."""


@dataclass
class EncodedDoc:
    """One tokenised conversation: `loss_mask[t]` is True where token t is an assistant token."""

    tokens: np.ndarray  # int64 [n]
    loss_mask: np.ndarray  # bool [n]
    audio_chunks: list[np.ndarray] = field(default_factory=list)  # float32 [samples_per_chunk] each, 16 kHz
    source: str = ""
    mels: list[np.ndarray] = field(default_factory=list)  # log-mel per chunk, when computed at encoding (feed.py)

    def __len__(self) -> int:
        return len(self.tokens)


def load_tokenizer(path: str | Path) -> MistralTokenizer:
    """A Tekken tokenizer in fine-tuning validation mode (conversations may end with an assistant turn)."""
    return load_tekken(path, ValidationMode.finetuning)


class ChatEncoder:
    """Encodes chat samples for training with one tokenizer (see the module docstring)."""

    def __init__(
        self,
        tokenizer: MistralTokenizer,
        tokens_per_chunk: int | None,
        audio_token_id: int | None,
        system_prompt_with_audio: str = "merge",
    ) -> None:
        self.tokenizer = tokenizer
        self.instruct = tokenizer.instruct_tokenizer
        self.tokens_per_chunk = tokens_per_chunk
        self.audio_token_id = audio_token_id
        if system_prompt_with_audio not in ("merge", "error"):
            raise ValueError(f"system_prompt_with_audio={system_prompt_with_audio!r}: expected 'merge' or 'error'")
        self.system_prompt_with_audio = system_prompt_with_audio
        audio_cfg = getattr(self.instruct, "audio_encoder", None)
        self.samples_per_chunk = (
            int(audio_cfg.audio_config.sampling_rate * audio_cfg.audio_config.chunk_length_s)
            if audio_cfg is not None and audio_cfg.audio_config.chunk_length_s
            else None
        )

    def encode(self, sample: dict[str, Any], source: str = "", where: str = "sample") -> EncodedDoc:
        """Tokens, loss mask and audio chunks of one sample; SampleError names `where` on bad input."""
        if "messages" not in sample and isinstance(sample.get("text"), str):
            return self._encode_document(sample["text"], source)
        if "messages" not in sample and "transcription" in sample:
            return self._encode_transcription(sample["transcription"], source, where)
        try:
            messages = _mistral_tool_call_ids(sample["messages"])
            request = ChatCompletionRequest.from_openai(messages, tools=sample.get("tools"))
            request = self._fold_system_prompt(request)
            validated = self.tokenizer._chat_completion_request_validator.validate_request(request)
            instruct_request = self.tokenizer._instruct_request_normalizer.from_chat_completion_request(validated)
            tokenized = self.instruct.encode_instruct(instruct_request)
        except SampleError:
            raise
        except Exception as exc:  # mistral-common raises several exception types for malformed chats
            raise SampleError(f"{where}: cannot encode chat: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        tokens = np.asarray(tokenized.tokens, dtype=np.int64)
        mask = self._assistant_mask(tokens, instruct_request.messages, where)
        chunks = self._audio_chunks(tokenized.audios, tokens, where)
        return EncodedDoc(tokens=tokens, loss_mask=mask, audio_chunks=chunks, source=source)

    def _encode_document(self, text: str, source: str) -> EncodedDoc:
        """A plain document: `<s>` text `</s>`, every token supervised (pretraining)."""
        tok = self.instruct.tokenizer
        tokens = np.asarray([tok.bos_id, *tok.encode(text, bos=False, eos=False), tok.eos_id], dtype=np.int64)
        return EncodedDoc(tokens=tokens, loss_mask=np.ones(len(tokens), dtype=bool), source=source)

    def _encode_transcription(self, item: Any, source: str, where: str) -> EncodedDoc:
        """Voxtral's ASR prompt for one clip, then the transcript and `</s>` (supervised)."""
        try:
            audio = item["input_audio"]
            request = TranscriptionRequest(
                model="sft", audio=RawAudio(data=audio["data"], format=audio["format"]), language=item["language"]
            )
            prompt = self.tokenizer.encode_transcription(request)
            tok = self.instruct.tokenizer
            target = [*tok.encode(item["text"], bos=False, eos=False), tok.eos_id]
        except Exception as exc:  # missing keys, bad audio, a tokenizer without transcription support
            raise SampleError(
                f"{where}: cannot encode transcription: {type(exc).__name__}: {exc}".splitlines()[0]
            ) from None
        tokens = np.asarray([*prompt.tokens, *target], dtype=np.int64)
        mask = np.zeros(len(tokens), dtype=bool)
        mask[len(prompt.tokens) :] = True
        return EncodedDoc(tokens, mask, self._audio_chunks(prompt.audios, tokens, where), source)

    def _fold_system_prompt(self, request: ChatCompletionRequest) -> ChatCompletionRequest:
        """Tekken v7+ refuses a system prompt next to audio; fold it into the first user turn if allowed."""
        messages = request.messages
        has_audio = any(
            isinstance(m, UserMessage)
            and isinstance(m.content, list)
            and any(getattr(c, "type", None) == "input_audio" for c in m.content)
            for m in messages
        )
        systems = [m for m in messages if isinstance(m, SystemMessage)]
        if not (has_audio and systems):
            return request
        if self.system_prompt_with_audio == "error":
            raise SampleError("system prompt next to audio (set data.system_prompt_with_audio: merge to fold it)")
        text = "\n\n".join(
            m.content if isinstance(m.content, str) else "".join(c.text for c in m.content) for m in systems
        )
        rest = [m for m in messages if not isinstance(m, SystemMessage)]
        first_user = next(i for i, m in enumerate(rest) if isinstance(m, UserMessage))
        user = rest[first_user]
        content = user.content if isinstance(user.content, list) else [{"type": "text", "text": user.content}]
        content = [{"type": "text", "text": text + "\n\n"}, *content]
        rest[first_user] = UserMessage.model_validate({"role": "user", "content": content})
        return request.model_copy(update={"messages": rest})

    def _assistant_mask(self, tokens: np.ndarray, messages: list, where: str) -> np.ndarray:
        """Mark each assistant message's own tokens, found in order in the full encoding."""
        mask = np.zeros(len(tokens), dtype=bool)
        _, last_user = self.instruct.find_first_last_user(_Messages(messages))
        pos = 0
        for idx, msg in enumerate(messages):
            if not isinstance(msg, AssistantMessage):
                continue
            span = np.asarray(self.instruct.encode_assistant_message(msg, idx < last_user), dtype=np.int64)
            start = _find(tokens, span, pos)
            if start < 0:
                raise SampleError(f"{where}: assistant message {idx} not found in its own encoding")
            mask[start : start + len(span)] = True
            pos = start + len(span)
        return mask

    def _audio_chunks(self, audios: list, tokens: np.ndarray, where: str) -> list[np.ndarray]:
        if not audios:
            return []
        if self.tokens_per_chunk is None or self.samples_per_chunk is None:
            raise SampleError(f"{where}: has audio but the model or tokenizer has no audio support")
        chunks: list[np.ndarray] = []
        for audio in audios:
            wave = np.asarray(audio.audio_array, dtype=np.float32)
            n = -(-len(wave) // self.samples_per_chunk)
            wave = np.pad(wave, (0, n * self.samples_per_chunk - len(wave)))
            chunks.extend(wave.reshape(n, self.samples_per_chunk))
        n_audio = int((tokens == self.audio_token_id).sum())
        if n_audio != len(chunks) * self.tokens_per_chunk:
            raise SampleError(
                f"{where}: {n_audio} [AUDIO] tokens for {len(chunks)} audio chunks; the model expects "
                f"{self.tokens_per_chunk} per chunk (tokenizer audio frame_rate disagrees with the encoder)"
            )
        return chunks


_TOOL_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_BASE62 = string.digits + string.ascii_letters


def _mistral_id(openai_id: str) -> str:
    """A stable 9-character alphanumeric id for an OpenAI tool-call id (e.g. `call_0001`)."""
    if _TOOL_CALL_ID.match(openai_id):
        return openai_id
    n = int.from_bytes(hashlib.sha256(openai_id.encode()).digest()[:8], "big")
    return "".join(_BASE62[(n // 62**i) % 62] for i in range(9))


def _mistral_tool_call_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with tool-call ids in the form Tekken requires (9 alphanumerics), the same id mapped the
    same way in assistant `tool_calls` and the `tool` replies; other messages are passed through."""
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if calls:
            message = {
                **message,
                "tool_calls": [
                    {**c, "id": _mistral_id(c["id"])} if isinstance(c, dict) and isinstance(c.get("id"), str) else c
                    for c in calls
                ],
            }
        if isinstance(message, dict) and isinstance(message.get("tool_call_id"), str):
            message = {**message, "tool_call_id": _mistral_id(message["tool_call_id"])}
        out.append(message)
    return out


@dataclass
class _Messages:
    """The one attribute `find_first_last_user` reads from a request."""

    messages: list


def _find(haystack: np.ndarray, needle: np.ndarray, start: int) -> int:
    """First index >= start where `needle` occurs in `haystack`, or -1."""
    n = len(needle)
    if n == 0:
        return start
    candidates = np.flatnonzero(haystack[start : len(haystack) - n + 1] == needle[0]) + start
    for c in candidates:
        if np.array_equal(haystack[c : c + n], needle):
            return int(c)
    return -1
