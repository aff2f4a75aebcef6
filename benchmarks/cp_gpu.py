"""The CP audio chunk distribution on one GPU: every CP rank's share of one packed 131k row, one after another.

Megatron-Core's CP needs one GPU per CP rank: NCCL refuses two ranks on one device, and gloo cannot send the
CUDA tensors Transformer Engine's ring attention exchanges. So on one GPU the ranks' sides run in one process:
the full-width Whisper-large encoder + projector + embedding (TE spec, fp32 with TF32 off) embed the row at
CP=1 and then as each CP rank does (`cp_index`), and the check compares each rank's embeddings with its slice
of CP=1's, compares our `partition_index` with Transformer Engine's `thd_get_partitioned_indices`, and times
the encoder per rank against CP=1. The decoder's ring attention itself is not run (it needs CP GPUs).
`cpu=True` runs the same path with tiny shapes on the local spec (no TE index check).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from benchmarks.sft_gpu import slice_config
from megatron_ext.audio.features import audio_tokens_per_chunk
from megatron_ext.config import ConfigError, DecoderConfig, ModelConfig, RopeConfig
from megatron_ext.data.chat import EncodedDoc
from megatron_ext.data.packing import collate, pack
from megatron_ext.models.cp_audio import local_audio, partition_index
from megatron_ext.testing.tiny_models import AUDIO_TOKEN_ID as AUDIO
from megatron_ext.testing.tiny_models import TINY_ENCODER, VOCAB_SIZE

PER_CHUNK = audio_tokens_per_chunk()  # 375


def tiny_config() -> ModelConfig:
    """Tiny decoder + 2-layer encoder for the CPU dry run."""
    decoder = DecoderConfig(
        num_layers=1,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=8192,
        rope=RopeConfig(theta=1e8),
    )
    return ModelConfig(decoder, TINY_ENCODER, AUDIO, 4, "voxtral")


def packed_row(cp: int, seq_length: int, docs: int, chunks: int, vocab: int, seed: int = 0) -> dict[str, Any]:
    """One THD row of `docs` documents padded for `cp`; document d's clip (the `chunks` spread over the
    documents) starts 187 tokens before the end of its slice d mod (2cp - 1), so its first chunk straddles a
    slice boundary, a different one per document."""
    if docs < 1 or chunks < 0 or seq_length % (2 * cp):
        raise ConfigError(f"--seq-length {seq_length}: needs a multiple of 2 x cp = {2 * cp} (and --docs >= 1)")
    rng = np.random.default_rng(seed)
    length = seq_length // docs // (2 * cp) * (2 * cp)  # input positions per document (tokens = length + 1)
    per_doc = [chunks // docs + (d < chunks % docs) for d in range(docs)]
    slice_size = length // (2 * cp)
    starts = [max(1, (d % max(1, 2 * cp - 1) + 1) * slice_size - PER_CHUNK // 2) for d in range(docs)]
    if any(start + PER_CHUNK * n + 1 > length for start, n in zip(starts, per_doc, strict=True)):
        raise ConfigError(f"{max(per_doc)} audio chunks per document do not fit {length} positions: fewer --chunks")
    encoded = []
    for start, n in zip(starts, per_doc, strict=True):
        tokens = rng.integers(1000, vocab, length + 1)
        tokens[start : start + PER_CHUNK * n] = AUDIO
        mels = [rng.standard_normal((128, 3000)).astype(np.float32) for _ in range(n)]
        encoded.append(EncodedDoc(tokens, np.ones(length + 1, bool), mels=mels))
    return collate([pack(encoded, [0] * docs, seq_length, 11, 2 * cp)], None)


def plan(cp: int, seq_length: int, docs: int, chunks: int) -> dict[str, Any]:
    """Which chunks and positions each CP rank holds (no model, no GPU)."""
    row = packed_row(cp, seq_length, docs, chunks, 131072)
    ids = row["tokens"].reshape(1, -1)
    ranks = []
    for rank in range(cp):
        index = partition_index(row["cu_seqlens_padded"], cp, rank)
        mine = local_audio(ids, index, AUDIO, PER_CHUNK)
        ranks.append({"positions": len(index), "audio_positions": len(mine.rows), "chunks": mine.chunks.tolist()})
    held = [set(r["chunks"]) for r in ranks]
    return {
        "cp": cp,
        "seq_length": seq_length,
        "documents": docs,
        "chunks": chunks,
        "ranks": ranks,
        "straddling_chunks": sorted(c for c in range(chunks) if sum(c in h for h in held) > 1),
    }


def _timed(fn, device: str) -> tuple[Any, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


def run(cp: int = 2, seq_length: int = 131072, docs: int = 4, chunks: int = 16, cpu: bool = False) -> dict[str, Any]:
    """Embed the row at CP=1 and as each CP rank; per rank: chunks encoded, seconds, max-abs vs CP=1's slice."""
    if not cpu and not torch.cuda.is_available():
        raise ConfigError("the CP chunk check needs CUDA (use --check or --cpu-dry-run on CPU)")
    from megatron_ext.compat.cpu import destroy_distributed, init_distributed
    from megatron_ext.models.build import BuildConfig, build_model

    device = "cpu" if cpu else "cuda"
    cfg = tiny_config() if cpu else slice_config(1, 32)
    row = packed_row(cp, seq_length, docs, chunks, cfg.decoder.vocab_size)
    ids, mel = row["tokens"].reshape(1, -1).to(device), row["mel"].to(device)
    init_distributed(tp=1)
    try:
        model = build_model(cfg, BuildConfig(backend="local" if cpu else "te", params_dtype="float32")).eval()
        model.to(device)
        out: dict[str, Any] = {"plan": plan(cp, seq_length, docs, chunks), "device": device}
        with torch.no_grad():
            model.encode_audio(mel[:1])  # warm-up (kernels, allocator)
            full, out["cp1_seconds"] = _timed(lambda: model.embed(ids, mel), device)
            out["ranks"] = []
            for rank in range(cp):
                index = partition_index(row["cu_seqlens_padded"].to(device), cp, rank)
                local, seconds = _timed(lambda index=index: model.embed(ids, mel, index), device)
                out["ranks"].append(
                    {
                        "rank": rank,
                        "chunks": len(local_audio(ids, index, AUDIO, PER_CHUNK).chunks),
                        "seconds": seconds,
                        "max_abs_vs_cp1": (local - full[index]).abs().max().item(),
                        "te_index_equal": _te_index_equal(row["cu_seqlens_padded"], seq_length, cp, rank, index),
                    }
                )
        return out
    finally:
        destroy_distributed()


def _te_index_equal(cu_padded: torch.Tensor, total: int, cp: int, rank: int, index: torch.Tensor) -> bool | None:
    """Our partition against Transformer Engine's own (None where TE is not installed, as on CPU)."""
    try:
        import transformer_engine_torch as tex
    except ImportError:
        return None
    theirs = tex.thd_get_partitioned_indices(cu_padded.to("cuda", torch.int32), total, cp, rank)
    return bool(torch.equal(theirs.long().cpu(), index.long().cpu()))
