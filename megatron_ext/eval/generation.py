"""Greedy, batched generation for text and audio prompts behind one interface.

`HFGenerator` (transformers on an HF directory, or on a Megatron checkpoint exported to HF) is the
reference; `MegatronGenerator` runs our `AudioLanguageModel` (Megatron-Core; fp32 or bf16, the TE spec on
GPU, tensor parallel under torchrun) with a static KV cache and is tested against it token for token.
Prompts are left-padded into one batch; audio goes through the model engineer's log-mel front-end (one
clip at a time, as Voxtral prepares audio). Served models are reached through `eval/openai_backend.py`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from megatron_ext.audio.features import CHUNK_FRAMES, log_mel_chunks
from megatron_ext.errors import ProjectError
from megatron_ext.eval.prompts import Prompt

EOS_ID = 2
PAD_ID = 11
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class NonFiniteLogits(ProjectError, ValueError):
    """A model produced NaN or Inf logits while decoding: its outputs (and any score from them) are meaningless."""


def require_finite(logits: torch.Tensor, name: str, step: int) -> torch.Tensor:
    """The next-token logits [batch, vocab] of a decoding step, refused when any is NaN or Inf (a check of
    batch x vocab values per step, small beside the step itself)."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits(f"{name}: NaN or Inf logits at decoding step {step}; no prediction or score is kept")
    return logits


class Generator(Protocol):
    """Greedy decoder: for each prompt, the new token ids up to (not including) EOS."""

    name: str
    has_audio: bool
    mel_frames: int  # log-mel frames per encoder chunk (3000 = Whisper's 30 s)

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[list[int]]: ...


def audio_features(prompts: Sequence[Prompt], chunk_frames: int = CHUNK_FRAMES) -> torch.Tensor | None:
    """Log-mel chunks [chunks, 128, chunk_frames] of every clip of the batch, in [AUDIO] order; None without
    audio."""
    clips = [clip for p in prompts for clip in p.audio]
    return torch.cat([log_mel_chunks(clip, chunk_frames) for clip in clips]) if clips else None


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
    features = audio_features(prompts, generator.mel_frames)
    if features is not None and not generator.has_audio:
        raise ValueError(f"{generator.name} has no audio encoder but the prompts contain audio")
    return ids, mask, features


def until_eos(tokens: Sequence[int], eos_id: int = EOS_ID) -> list[int]:
    """The tokens before the first EOS (padding after EOS is dropped with it)."""
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


class HFGenerator:
    """A transformers model (VoxtralForConditionalGeneration or a causal LM), fp32 by default, on the GPU when
    there is one (whole, no TP); the reference."""

    def __init__(self, model: torch.nn.Module, name: str):
        from transformers import VoxtralForConditionalGeneration

        self.model = model.eval()
        self.name = name
        self.has_audio = isinstance(model, VoxtralForConditionalGeneration)
        self.mel_frames = 2 * model.config.audio_config.max_source_positions if self.has_audio else CHUNK_FRAMES

    @classmethod
    def from_hf_dir(cls, checkpoint: str | Path, dtype: str = "fp32") -> HFGenerator:
        """Load an HF checkpoint directory (config.json + safetensors), validated by the shared reader first
        and loaded by transformers from safetensors only (a `pytorch_model.bin` pickle is never read)."""
        from megatron_ext.checkpoint.atomic import CheckpointError
        from megatron_ext.checkpoint.source import open_checkpoint

        with open_checkpoint(Path(checkpoint)) as source:
            if source.kind != "hf":
                raise CheckpointError(f"{checkpoint}: {source.description}, not an HF checkpoint")
            audio = source.cfg.hf_architecture == "voxtral"
            vision = bool(source.dropped)  # Mistral3: transformers reads it whole; the vision tower is unused
        from transformers import AutoModelForCausalLM, Mistral3ForConditionalGeneration, VoxtralForConditionalGeneration

        model_cls = VoxtralForConditionalGeneration if audio else AutoModelForCausalLM
        model_cls = Mistral3ForConditionalGeneration if vision else model_cls
        model = model_cls.from_pretrained(str(checkpoint), dtype=DTYPES[dtype], use_safetensors=True)
        if torch.cuda.is_available():
            model = model.cuda()
        return cls(model, generator_name(checkpoint, "hf", dtype))

    @classmethod
    def from_megatron_dir(cls, checkpoint: str | Path, dtype: str = "fp32") -> HFGenerator:
        """Export a Megatron torch_dist checkpoint to HF (the conversion tool, in a temporary dir) and load it."""
        from megatron_ext.checkpoint.convert import convert

        with tempfile.TemporaryDirectory(prefix="eval-hf-export-") as tmp:
            convert(Path(checkpoint), Path(tmp) / "hf", "hf", progress=False)
            generator = cls.from_hf_dir(Path(tmp) / "hf", dtype)
        generator.name = generator_name(checkpoint, "hf", dtype)
        return generator

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[list[int]]:
        ids, mask, features = batch_inputs(prompts, self)
        from transformers import LogitsProcessorList

        device = self.model.device
        extra = {} if features is None else {"input_features": features.to(device, self.model.dtype)}
        start = ids.shape[1]
        out = self.model.generate(
            logits_processor=LogitsProcessorList([lambda seen, scores: _checked(scores, self.name, seen, start)]),
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            **extra,
        )
        return [until_eos(row) for row in out[:, ids.shape[1] :].tolist()]


def _checked(scores: torch.Tensor, name: str, seen: torch.Tensor, start: int) -> torch.Tensor:
    """transformers logits processor: the scores unchanged, after the finite check."""
    return require_finite(scores, name, seen.shape[1] - start)


def build_generation_model(cfg, dtype: str, tp: int, backend: str = "auto", init_weights: bool = False):
    """`AudioLanguageModel` for generation on this rank: `dtype` fp32|bf16, TP `tp`, gathered logits."""
    from megatron.core import parallel_state

    from megatron_ext.compat.cpu import init_distributed
    from megatron_ext.models.build import BuildConfig, build_model

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if (
        not parallel_state.model_parallel_is_initialized()
        or parallel_state.get_tensor_model_parallel_world_size() != tp
    ):
        init_distributed(tp=tp, pp=1)
    params_dtype = "bfloat16" if dtype == "bf16" else "float32"
    build = BuildConfig(backend=backend, params_dtype=params_dtype, init_weights=init_weights, parallel_output=False)
    return build_model(cfg, build)


def _true_positions(padding: torch.Tensor) -> torch.Tensor:
    """Each token's position in its own prompt, [b, s] (left padding gets 0)."""
    return ((~padding).long().cumsum(1) - 1).clamp(min=0)


def _attention_mask(key_padding: torch.Tensor, queries: int) -> torch.Tensor:
    """Megatron's boolean mask [b, 1, queries, keys] (True = masked): causal over the last `queries`
    positions plus the left padding of every row."""
    keys = key_padding.shape[1]
    causal = torch.ones(queries, keys, dtype=torch.bool, device=key_padding.device).triu(keys - queries + 1)
    return causal[None, None] | key_padding[:, None, None, :]


class MegatronGenerator:
    """Greedy decoding on our `AudioLanguageModel` (Megatron-Core): a built model, or `load` from any checkpoint
    `open_checkpoint` reads.

    `dtype` fp32|bf16; the layer spec is Megatron's choice (`resolve_backend`: TE with CUDA, else local);
    `tp` > 1 shards the model over the process group's ranks (start with torchrun; gloo on CPU), each
    rank reading only its shards and every rank returning the same tokens (logits are gathered).
    Decoding runs on Megatron-Core's static KV cache (`StaticInferenceContext`): one prefill over the
    left-padded prompts with an explicit causal + padding mask, then one token per step. Rope there is
    indexed by cache slot, which leaves attention unchanged (rope is relative); the llama-4 query scale is
    absolute, so every step passes the new tokens' true per-row positions (`DecoderModel`).
    `use_cache=False` recomputes the whole prefix each step instead (the check of the cached path).
    """

    def __init__(self, model: torch.nn.Module, cfg, name: str):
        self.model, self.cfg, self.name = model.eval(), cfg, name
        self.dtype = next(model.parameters()).dtype
        self.has_audio = cfg.has_audio
        self.mel_frames = cfg.encoder.mel_frames if cfg.has_audio else CHUNK_FRAMES
        self.use_cache = True

    @classmethod
    def load(cls, checkpoint: str | Path, dtype: str = "fp32", tp: int = 1, backend: str = "auto") -> MegatronGenerator:
        """Build the model for this rank (TP `tp`, starting Megatron's parallel state) and load its shards."""
        from megatron_ext.checkpoint.source import open_checkpoint
        from megatron_ext.models.loading import load_full_tensors

        with open_checkpoint(Path(checkpoint)) as source:
            model = build_generation_model(source.cfg, dtype, tp, backend, init_weights=False)
            load_full_tensors(model, source.megatron().get)
            cfg = source.cfg
        return cls(model, cfg, generator_name(checkpoint, "megatron", dtype))

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[list[int]]:
        ids, mask, features = batch_inputs(prompts, self)
        device = next(self.model.parameters()).device
        ids, padding = ids.to(device), (mask == 0).to(device)
        features = None if features is None else features.to(device, self.dtype)
        prompt_embeddings = self.model.embed(ids, features)  # [s, b, h]
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

    @torch.inference_mode()
    def logits(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """Logits [b, s, vocab] of every position of the left-padded batch, no cache (for precision checks)."""
        ids, mask, features = batch_inputs(prompts, self)
        device = next(self.model.parameters()).device
        ids, padding = ids.to(device), (mask == 0).to(device)
        features = None if features is None else features.to(device, self.dtype)
        embeddings = self.model.embed(ids, features)
        return self._logits(ids, _true_positions(padding), _attention_mask(padding, ids.shape[1]), embeddings)

    def _logits(self, ids, positions, mask, embeddings, context=None) -> torch.Tensor:
        return self.model.language_model(
            ids, positions, mask, decoder_input=embeddings, inference_context=context, runtime_gather_output=True
        )

    def _cached_steps(self, ids, padding, embeddings, max_new_tokens):
        from megatron.core.inference.contexts import StaticInferenceContext

        batch, length = ids.shape
        context = StaticInferenceContext(batch, length + max_new_tokens)
        positions = _true_positions(padding)
        logits = self._logits(ids, positions, _attention_mask(padding, length), embeddings, context)
        context.sequence_len_offset = length
        for step in range(max_new_tokens):
            token = require_finite(logits[:, -1], self.name, step).argmax(-1)
            yield token
            padding = torch.cat([padding, torch.zeros_like(padding[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            embedded = self.model.language_model.embedding(input_ids=token[:, None], position_ids=None)
            logits = self._logits(token[:, None], positions, _attention_mask(padding, 1), embedded, context)
            context.sequence_len_offset += 1

    def _recomputed_steps(self, ids, padding, embeddings, max_new_tokens):
        for step in range(max_new_tokens):
            logits = self._logits(ids, _true_positions(padding), _attention_mask(padding, ids.shape[1]), embeddings)
            token = require_finite(logits[:, -1], self.name, step).argmax(-1)
            yield token
            ids = torch.cat([ids, token[:, None]], dim=1)
            padding = torch.cat([padding, torch.zeros_like(padding[:, :1])], dim=1)
            new = self.model.language_model.embedding(input_ids=token[:, None], position_ids=None)
            embeddings = torch.cat([embeddings, new], dim=0)


BACKENDS = ("megatron", "hf", "openai")


def generator_name(checkpoint: str | Path | None, backend: str, dtype: str = "fp32", model: str | None = None) -> str:
    """The name a generator gets (part of its predictions' resume key), known before anything is loaded:
    `megatron:DIR[:bf16]`, `hf:DIR` (`hf-export:DIR` for a Megatron checkpoint), `openai:MODEL`."""
    from megatron_ext.checkpoint.megatron_lm import resolve
    from megatron_ext.checkpoint.metadata import META_FILE

    if backend == "openai":
        return f"openai:{model}"
    name = Path(checkpoint).name
    if backend == "megatron":
        return f"megatron:{name}" + ("" if dtype == "fp32" else f":{dtype}")
    return f"{'hf-export' if (resolve(Path(checkpoint)) / META_FILE).is_file() else 'hf'}:{name}"


def load_generator(checkpoint: str | Path, backend: str = "megatron", dtype: str = "fp32", tp: int = 1) -> Generator:
    """The in-process generator for a checkpoint directory (Megatron torch_dist, HF or Mistral-native).

    backend "megatron": our AudioLanguageModel (dtype, TP); "hf": transformers on the HF layout (a Megatron
    checkpoint is exported to HF first) — the reference. ("openai" is built by `eval.openai_backend`.)
    """
    from megatron_ext.checkpoint.megatron_lm import resolve
    from megatron_ext.checkpoint.metadata import META_FILE

    checkpoint = Path(checkpoint)
    if backend == "megatron":
        return MegatronGenerator.load(checkpoint, dtype=dtype, tp=tp)
    if backend != "hf":
        raise ValueError(f"unknown in-process generation backend {backend!r}; known: megatron, hf")
    if tp != 1:
        raise ValueError("--tp applies to the megatron backend only")
    if (resolve(checkpoint) / META_FILE).is_file():
        return HFGenerator.from_megatron_dir(checkpoint, dtype)
    if (checkpoint / "config.json").is_file():
        return HFGenerator.from_hf_dir(checkpoint, dtype)
    raise ValueError(f"{checkpoint}: not a checkpoint directory (no {META_FILE} or config.json)")
