"""Logits of a checkpoint on CPU in fp32, from the Megatron model and, optionally, HF transformers on the same input.

Used to check a conversion: any input `checkpoint.source.open_checkpoint` reads (Megatron torch_dist with its
metadata, HF safetensors with FP8 dequantised on read, Mistral-native) is loaded into
`AudioLanguageModel` (local spec, TP=1) via `checkpoint/mapping.py`. The HF reference is the model's
`hf_architecture` class built from `ModelConfig.to_hf()` and fed the same weights under HF names.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_ext.audio.features import audio_tokens_per_chunk, log_mel_chunks
from megatron_ext.audio.waveform import load_audio
from megatron_ext.checkpoint import mapping
from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.source import Source, open_checkpoint
from megatron_ext.config import ConfigError, ModelConfig
from megatron_ext.models.tokens import check_audio_token


@dataclass
class LogitsResult:
    tokens: list[int]  # after expanding one [AUDIO] marker per clip, if that form was used
    logits: torch.Tensor  # [seq, vocab] float32
    max_abs_diff: float | None = None  # vs HF transformers, when compared


def expand_audio_markers(
    tokens: list[int], audio_token_id: int, chunks_per_clip: list[int], per_chunk: int
) -> list[int]:
    """One [AUDIO] per clip -> per_chunk x chunks [AUDIO] tokens for that clip; a full expansion passes through."""
    markers = [i for i, t in enumerate(tokens) if t == audio_token_id]
    if len(markers) == sum(chunks_per_clip) * per_chunk:
        return list(tokens)
    if len(markers) != len(chunks_per_clip):
        raise ConfigError(
            f"--tokens has {len(markers)} [AUDIO] (id {audio_token_id}) tokens for {len(chunks_per_clip)} clip(s): "
            f"give one per clip, or exactly {sum(chunks_per_clip) * per_chunk} ({per_chunk} per 30 s chunk)"
        )
    out: list[int] = []
    clips = iter(chunks_per_clip)
    for t in tokens:
        out += [audio_token_id] * (per_chunk * next(clips)) if t == audio_token_id else [t]
    return out


def hf_reference_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The HF transformers model of `cfg.hf_architecture` holding `tensors` (fp32, eval mode).

    Loaded through `from_pretrained` from a temporary directory, so transformers applies its own
    checkpoint key conversions exactly as for a real hub checkpoint.
    """
    import transformers

    hf = cfg.to_hf()
    cls = getattr(transformers, hf["architectures"][0])
    with tempfile.TemporaryDirectory(prefix="hf-reference-") as tmp:
        save_file(
            {n: t.float().contiguous() for n, t in tensors.items()},
            f"{tmp}/model.safetensors",
            metadata={"format": "pt"},
        )
        Path(tmp, "config.json").write_text(json.dumps({**hf, "dtype": "float32"}))
        return cls.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True).eval()


def _hf_tensors(inp: Source) -> dict[str, torch.Tensor]:
    if inp.naming == "megatron":
        return dict(mapping.megatron_to_hf(inp.cfg, inp.get))
    return {name: inp.get(name) for name in mapping.hf_names(inp.cfg)}


def checkpoint_logits(
    directory: Path, tokens: list[int], audio: list[Path] | None = None, compare_hf: bool = False
) -> LogitsResult:
    """Run the checkpoint in `directory` on `tokens` (+ audio clips) and return fp32 logits [seq, vocab]."""
    inp = open_checkpoint(Path(directory))
    try:
        cfg = inp.cfg
        if inp.tokenizer is not None:
            check_audio_token(cfg, inp.tokenizer)
        bad = [t for t in tokens if not 0 <= t < cfg.decoder.vocab_size]
        if bad:
            raise ConfigError(f"--tokens: id {bad[0]} is outside the vocabulary [0, {cfg.decoder.vocab_size})")
        features = None
        if audio:
            if cfg.encoder is None:
                raise ConfigError(f"{directory}: --audio given but the checkpoint has no audio encoder")
            clips = [log_mel_chunks(load_audio(p), cfg.encoder.mel_frames) for p in audio]
            per_chunk = audio_tokens_per_chunk(cfg.encoder.max_source_positions, cfg.projector_stack)
            tokens = expand_audio_markers(tokens, cfg.audio_token_id, [c.shape[0] for c in clips], per_chunk)
            features = torch.cat(clips)
        ids = torch.tensor([tokens])
        from megatron.core import parallel_state  # heavy imports only once the inputs are known to be good

        from megatron_ext.compat.cpu import destroy_distributed, init_distributed
        from megatron_ext.models.build import BuildConfig, build_model
        from megatron_ext.models.loading import load_full_tensors

        started = not parallel_state.model_parallel_is_initialized()
        if started:  # a lone process at TP=1; torn down again below so callers keep a clean state
            init_distributed(tp=1, pp=1)
        try:
            model = build_model(cfg, BuildConfig(backend="local", init_weights=False)).eval()
            load_full_tensors(model, inp.megatron().get)
            with torch.no_grad():
                logits = model(
                    ids, torch.arange(ids.shape[1])[None], audio_features=features, runtime_gather_output=True
                )[0].float()
        finally:
            if started:
                destroy_distributed()
        _check_finite(logits, directory, tokens)
        result = LogitsResult(tokens, logits)
        if compare_hf:
            hf = hf_reference_model(cfg, _hf_tensors(inp))
            kwargs = {"input_features": features} if features is not None else {}
            with torch.no_grad():
                ref = hf(input_ids=ids, **kwargs).logits[0].float()
            result.max_abs_diff = (logits - ref).abs().max().item()
        return result
    finally:
        inp.close()


def _check_finite(logits: torch.Tensor, directory: Path, tokens: list[int]) -> None:
    """Refuse NaN/Inf logits, naming the checkpoint and the first position (and its token) that has them."""
    bad = (~torch.isfinite(logits)).any(-1).nonzero()
    if len(bad):
        i = int(bad[0])
        raise CheckpointError(
            f"{directory}: logits are NaN or Inf from position {i} (token {tokens[i]}) on; "
            "the checkpoint's weights or settings give non-finite values"
        )


def write_logits(result: LogitsResult, output: Path) -> None:
    """safetensors with key `logits` [seq, vocab]; token ids in the metadata; written atomically."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    meta = {"tokens": ",".join(map(str, result.tokens))}
    if result.max_abs_diff is not None:
        meta["max_abs_diff_vs_hf"] = repr(result.max_abs_diff)
    save_file({"logits": result.logits.contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, output)
