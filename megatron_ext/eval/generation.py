"""Greedy, batched generation for text and audio prompts behind one interface.

`HFGenerator` (transformers on an HF checkpoint directory) is the reference implementation; the Megatron
path implements the same `Generator` protocol and is tested against it token for token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from megatron_ext.eval.prompts import Prompt

EOS_ID = 2
PAD_ID = 11


class Generator(Protocol):
    """Greedy decoder: for each prompt, the new token ids up to (not including) EOS."""

    name: str
    has_audio: bool

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[list[int]]: ...


def log_mel(chunks: Sequence[np.ndarray]) -> torch.Tensor:
    """Whisper log-mel features [chunks, 128, 3000] of 30 s, 16 kHz chunks (transformers' extractor)."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=128)
    return extractor(list(chunks), sampling_rate=16_000, return_tensors="pt").input_features


def left_pad(prompts: Sequence[Prompt], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with prompts right-aligned so every row's next token is at the end."""
    width = max(len(p.tokens) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt.tokens) :] = torch.tensor(prompt.tokens)
        mask[row, width - len(prompt.tokens) :] = 1
    return ids, mask


def until_eos(tokens: Sequence[int], eos_id: int = EOS_ID) -> list[int]:
    """The tokens before the first EOS (padding after EOS is dropped with it)."""
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


class HFGenerator:
    """A transformers model (VoxtralForConditionalGeneration or a causal LM) in fp32 on CPU."""

    def __init__(self, model: torch.nn.Module, name: str):
        from transformers import VoxtralForConditionalGeneration

        self.model = model.eval()
        self.name = name
        self.has_audio = isinstance(model, VoxtralForConditionalGeneration)

    @classmethod
    def from_hf_dir(cls, checkpoint: str | Path) -> HFGenerator:
        """Load an HF checkpoint directory (config.json + safetensors)."""
        from transformers import AutoModelForCausalLM, VoxtralForConditionalGeneration

        architectures = json.loads((Path(checkpoint) / "config.json").read_text()).get("architectures", [])
        model_cls = VoxtralForConditionalGeneration if "VoxtralForConditionalGeneration" in architectures else AutoModelForCausalLM
        return cls(model_cls.from_pretrained(str(checkpoint), dtype=torch.float32), f"hf:{Path(checkpoint).name}")

    @classmethod
    def from_megatron_dir(cls, checkpoint: str | Path) -> HFGenerator:
        """Export a Megatron torch_dist checkpoint to HF (the conversion tool, into a temporary directory) and load it."""
        import tempfile

        from megatron_ext.checkpoint.convert import convert

        with tempfile.TemporaryDirectory(prefix="eval-hf-export-") as tmp:
            convert(Path(checkpoint), Path(tmp) / "hf", "hf", progress=False)
            generator = cls.from_hf_dir(Path(tmp) / "hf")
        generator.name = f"hf-export:{Path(checkpoint).name}"
        return generator

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[list[int]]:
        ids, mask = left_pad(prompts)
        extra = {}
        chunks = [c for p in prompts for c in p.audio_chunks]
        if chunks:
            if not self.has_audio:
                raise ValueError(f"{self.name} has no audio encoder but the prompts contain audio")
            extra["input_features"] = log_mel(chunks)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=EOS_ID, pad_token_id=PAD_ID, **extra,
        )
        return [until_eos(row) for row in out[:, ids.shape[1] :].tolist()]


def load_generator(checkpoint: str | Path) -> Generator:
    """The generator for a checkpoint directory: Megatron (checkpoint_meta.json) or HF (config.json)."""
    from megatron_ext.checkpoint.metadata import META_FILE

    checkpoint = Path(checkpoint)
    if (checkpoint / META_FILE).is_file():
        return HFGenerator.from_megatron_dir(checkpoint)
    if (checkpoint / "config.json").is_file():
        return HFGenerator.from_hf_dir(checkpoint)
    raise ValueError(f"{checkpoint}: not a checkpoint directory (no {META_FILE} or config.json)")
