"""Greedy, batched generation for text and audio prompts behind one interface.

`HFGenerator` (transformers on an HF directory, or on a Megatron checkpoint exported to HF) is the
reference; `MegatronGenerator` runs our `AudioLanguageModel` (Megatron-Core) with a static KV cache and
is tested against it token for token. Prompts are left-padded into one batch; audio goes through the
model engineer's log-mel front-end (one clip at a time, as Voxtral prepares audio).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from megatron_ext.audio.features import log_mel_chunks
from megatron_ext.eval.prompts import Prompt

EOS_ID = 2
PAD_ID = 11


class Generator(Protocol):
    """Greedy decoder: for each prompt, the new token ids up to (not including) EOS."""

    name: str
    has_audio: bool

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[list[int]]: ...


def audio_features(prompts: Sequence[Prompt]) -> torch.Tensor | None:
    """Log-mel chunks [chunks, 128, 3000] of every clip of the batch, in [AUDIO] order; None without audio."""
    clips = [clip for p in prompts for clip in p.audio]
    return torch.cat([log_mel_chunks(clip) for clip in clips]) if clips else None


def left_pad(prompts: Sequence[Prompt], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with prompts right-aligned so every row's next token is at the end."""
    width = max(len(p.tokens) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt.tokens) :] = torch.tensor(prompt.tokens)
        mask[row, width - len(prompt.tokens) :] = 1
    return ids, mask


def batch_inputs(
    prompts: Sequence[Prompt], generator: Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Left-padded ids, attention mask and log-mel features of a batch; refuses audio for a text-only model."""
    ids, mask = left_pad(prompts)
    features = audio_features(prompts)
    if features is not None and not generator.has_audio:
        raise ValueError(f"{generator.name} has no audio encoder but the prompts contain audio")
    return ids, mask, features


def until_eos(tokens: Sequence[int], eos_id: int = EOS_ID) -> list[int]:
    """The tokens before the first EOS (padding after EOS is dropped with it)."""
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


class HFGenerator:
    """A transformers model (VoxtralForConditionalGeneration or a causal LM) in fp32; the reference path."""

    def __init__(self, model: torch.nn.Module, name: str):
        from transformers import VoxtralForConditionalGeneration

        self.model = model.eval()
        self.name = name
        self.has_audio = isinstance(model, VoxtralForConditionalGeneration)

    @classmethod
    def from_hf_dir(cls, checkpoint: str | Path) -> HFGenerator:
        """Load an HF checkpoint directory (config.json + safetensors), validated by the shared reader first
        and loaded by transformers from safetensors only (a `pytorch_model.bin` pickle is never read)."""
        from megatron_ext.checkpoint.atomic import CheckpointError
        from megatron_ext.checkpoint.source import open_checkpoint

        with open_checkpoint(Path(checkpoint)) as source:
            if source.kind != "hf":
                raise CheckpointError(f"{checkpoint}: {source.description}, not an HF checkpoint")
            audio = source.cfg.hf_architecture == "voxtral"
        from transformers import AutoModelForCausalLM, VoxtralForConditionalGeneration

        model_cls = VoxtralForConditionalGeneration if audio else AutoModelForCausalLM
        model = model_cls.from_pretrained(str(checkpoint), dtype=torch.float32, use_safetensors=True)
        return cls(model, f"hf:{Path(checkpoint).name}")

    @classmethod
    def from_megatron_dir(cls, checkpoint: str | Path) -> HFGenerator:
        """Export a Megatron torch_dist checkpoint to HF (the conversion tool, in a temporary dir) and load it."""
        from megatron_ext.checkpoint.convert import convert

        with tempfile.TemporaryDirectory(prefix="eval-hf-export-") as tmp:
            convert(Path(checkpoint), Path(tmp) / "hf", "hf", progress=False)
            generator = cls.from_hf_dir(Path(tmp) / "hf")
        generator.name = f"hf-export:{Path(checkpoint).name}"
        return generator

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[list[int]]:
        ids, mask, features = batch_inputs(prompts, self)
        extra = {} if features is None else {"input_features": features}
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            **extra,
        )
        return [until_eos(row) for row in out[:, ids.shape[1] :].tolist()]


def _attention_mask(key_padding: torch.Tensor, queries: int) -> torch.Tensor:
    """Megatron's boolean mask [b, 1, queries, keys] (True = masked): causal over the last `queries`
    positions plus the left padding of every row."""
    keys = key_padding.shape[1]
    causal = torch.ones(queries, keys, dtype=torch.bool).triu(keys - queries + 1)
    return causal[None, None] | key_padding[:, None, None, :]


class MegatronGenerator:
    """Our `AudioLanguageModel` (Megatron-Core, local spec, TP=1) from any checkpoint `open_checkpoint` reads.

    Decoding runs on Megatron-Core's static KV cache (`StaticInferenceContext`): one prefill over the
    left-padded prompts with an explicit causal + padding mask, then one token per step. Rope there is
    indexed by position in the padded row, which leaves attention unchanged (rope is relative); the
    llama-4 query scaling is absolute, so a model with it decodes without the cache, recomputing the
    decoder over true per-row positions each step.
    """

    def __init__(self, checkpoint: str | Path):
        from megatron.core import parallel_state

        from megatron_ext.checkpoint.source import open_checkpoint
        from megatron_ext.compat.cpu import init_distributed
        from megatron_ext.models.build import BuildConfig, build_model
        from megatron_ext.models.loading import load_full_tensors

        with open_checkpoint(Path(checkpoint)) as source:
            if not parallel_state.model_parallel_is_initialized():
                init_distributed(tp=1, pp=1)
            self.cfg = source.cfg
            build = BuildConfig(backend="local", init_weights=False, parallel_output=False)
            self.model = build_model(self.cfg, build).eval()
            load_full_tensors(self.model, source.megatron().get)
        self.name = f"megatron:{Path(checkpoint).name}"
        self.has_audio = self.cfg.has_audio
        self.use_cache = self.cfg.decoder.rope.llama4_scaling_beta is None

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[list[int]]:
        ids, mask, features = batch_inputs(prompts, self)
        device = next(self.model.parameters()).device
        ids, padding = ids.to(device), (mask == 0).to(device)
        prompt_embeddings = self.model.embed(ids, None if features is None else features.to(device))  # [s, b, h]
        step = self._cached_steps if self.use_cache else self._recomputed_steps
        out = torch.full((ids.shape[0], 0), PAD_ID, dtype=torch.long, device=device)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        for next_token in step(ids, padding, prompt_embeddings, max_new_tokens):
            next_token = torch.where(done, torch.full_like(next_token, PAD_ID), next_token)
            out = torch.cat([out, next_token[:, None]], dim=1)
            done |= next_token == EOS_ID
            if bool(done.all()):
                break
        return [until_eos(row) for row in out.tolist()]

    def _logits(self, ids, positions, mask, embeddings, context=None) -> torch.Tensor:
        return self.model.language_model(
            ids, positions, mask, decoder_input=embeddings, inference_context=context, runtime_gather_output=True
        )

    def _cached_steps(self, ids, padding, embeddings, max_new_tokens):
        from megatron.core.inference.contexts import StaticInferenceContext

        batch, length = ids.shape
        context = StaticInferenceContext(batch, length + max_new_tokens)
        logits = self._logits(ids, None, _attention_mask(padding, length), embeddings, context)
        context.sequence_len_offset = length
        for _ in range(max_new_tokens):
            token = logits[:, -1].argmax(-1)
            yield token
            padding = torch.cat([padding, torch.zeros_like(padding[:, :1])], dim=1)
            embedded = self.model.language_model.embedding(input_ids=token[:, None], position_ids=None)
            logits = self._logits(token[:, None], None, _attention_mask(padding, 1), embedded, context)
            context.sequence_len_offset += 1

    def _recomputed_steps(self, ids, padding, embeddings, max_new_tokens):
        for _ in range(max_new_tokens):
            positions = ((~padding).long().cumsum(1) - 1).clamp(min=0)
            logits = self._logits(ids, positions, _attention_mask(padding, ids.shape[1]), embeddings)
            token = logits[:, -1].argmax(-1)
            yield token
            ids = torch.cat([ids, token[:, None]], dim=1)
            padding = torch.cat([padding, torch.zeros_like(padding[:, :1])], dim=1)
            new = self.model.language_model.embedding(input_ids=token[:, None], position_ids=None)
            embeddings = torch.cat([embeddings, new], dim=0)


BACKENDS = ("megatron", "hf")


def load_generator(checkpoint: str | Path, backend: str = "megatron") -> Generator:
    """The generator for a checkpoint directory (Megatron torch_dist, HF or Mistral-native).

    backend "megatron": our AudioLanguageModel; "hf": transformers on the HF layout (a Megatron checkpoint
    is exported to HF first) — the reference.
    """
    from megatron_ext.checkpoint.megatron_lm import resolve
    from megatron_ext.checkpoint.metadata import META_FILE

    checkpoint = Path(checkpoint)
    if backend == "megatron":
        return MegatronGenerator(checkpoint)
    if backend != "hf":
        raise ValueError(f"unknown generation backend {backend!r}; known: {', '.join(BACKENDS)}")
    if (resolve(checkpoint) / META_FILE).is_file():
        return HFGenerator.from_megatron_dir(checkpoint)
    if (checkpoint / "config.json").is_file():
        return HFGenerator.from_hf_dir(checkpoint)
    raise ValueError(f"{checkpoint}: not a checkpoint directory (no {META_FILE} or config.json)")
