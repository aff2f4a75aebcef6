"""Benchmark samples -> token prompts with mistral-common (the tokenizer every checkpoint ships as tekken.json).

Audio prompts follow Voxtral's chat format (`[INST][BEGIN_AUDIO][AUDIO]x375 per 30 s...[/INST]`) and
ASR uses its transcription format (`...[/INST]lang:en[TRANSCRIBE]`); mistral-common pads audio to 30 s
chunks and counts the [AUDIO] tokens, so prompts match what the parent models were trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mistral_common.protocol.instruct.chunk import AudioChunk, RawAudio, TextChunk
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.transcription.request import TranscriptionRequest
from mistral_common.tokens.tokenizers.audio import Audio
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

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
    if bench.kind == "asr":
        request = TranscriptionRequest(model="eval", audio=_raw_audio(sample), language="en")
        encoded = tokenizer.encode_transcription(request)
    else:
        content: list = []
        if bench.needs_audio:
            content.append(AudioChunk(input_audio=_raw_audio(sample)))
        if bench.kind == "mcq":
            content.append(TextChunk(text=mcq_text(sample, with_question=not bench.needs_audio)))
        elif sample.fields.get("instruction"):
            content.append(TextChunk(text=sample.fields["instruction"]))
        encoded = tokenizer.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content=content)]))
    return Prompt(list(encoded.tokens), [a.audio_array for a in encoded.audios])


def _raw_audio(sample: Sample) -> RawAudio:
    return RawAudio.from_audio(Audio(sample.audio(), SAMPLE_RATE, format="wav"))
