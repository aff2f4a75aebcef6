"""Per-rank throughput of the recipe's real step, and its projection to the 128-GPU run (TP=4 x DP=32).

One GPU runs the shapes one rank of TP=`tp` holds: Mistral Small 3's layer with heads, KV groups, SwiGLU
width and vocabulary divided by `tp` (TP=4: 8 query heads, 2 KV heads, ffn 8192, vocab 32768), the full
hidden 5120 for norms and the residual stream; a 131072-token packed row (THD) of a few documents, full
recompute, the chunked supervised-token loss, BF16 and FP8 with current (tensorwise) scaling. The slice
has `layers` layers (8 keep one H100 run of both precisions within ~2 minutes); its time is scaled to the
40 layers by FLOPs (same achieved TFLOP/s) and the communication a real step adds is modelled (`CommModel`),
since one GPU cannot measure it. Unlike a sequence-parallel rank, the norms and residual run over the whole
sequence here (~2% of the FLOPs), so the measured compute is a slight overestimate.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

import torch

from benchmarks.sft_gpu import run, slice_config
from megatron_ext.config import ConfigError, DecoderConfig, ModelConfig, RopeConfig
from megatron_ext.training.metrics import decoder_matmul_params, step_flops

FULL_LAYERS = 40
PRECISIONS = {"bf16": None, "fp8_tensorwise": "hybrid"}  # name -> TE FP8 format (recipe: tensorwise)


@dataclasses.dataclass(frozen=True)
class CommModel:
    """The communication of one step that a single-GPU run cannot see, as bytes over a stated bandwidth; no
    overlap with compute is assumed, so the projection is a lower bound on throughput.

    TP (inside a node, NVLink): sequence parallel all-gathers the [s, hidden] bf16 activations before the
    attention and MLP blocks and reduce-scatters after them: 4 collectives per layer forward, 4 backward,
    4 more for the full-recompute forward; plus the embedding's reduce-scatter/all-gather over s and the
    chunked loss's all-gather/reduce-scatter over the supervised tokens. A ring moves (tp-1)/tp of the full
    tensor per GPU. `nvlink_gbs`: NCCL's bus bandwidth for these collectives on H100 NVLink 4 (450 GB/s per
    direction per GPU; ~360 GB/s measured by nccl-tests at GB sizes).
    DP (across nodes): the distributed optimizer reduce-scatters the fp32 gradients and all-gathers the bf16
    parameters of this rank's TP shard over DP: (4 + 2) bytes x shard parameters x (dp-1)/dp per step.
    `network_gbs`: one 400 Gb/s InfiniBand NIC per GPU (50 GB/s), ~80% achieved.
    """

    nvlink_gbs: float = 360.0
    network_gbs: float = 40.0

    def tp_seconds(self, tp: int, seq: int, supervised: int, hidden: int, layers: int, recompute: bool) -> float:
        per_layer = 12 if recompute else 8
        token_collectives = layers * per_layer * seq + 2 * seq + 2 * supervised
        return token_collectives * hidden * 2 * (tp - 1) / tp / (self.nvlink_gbs * 1e9)

    def dp_seconds(self, dp: int, shard_params: float) -> float:
        return 6 * shard_params * (dp - 1) / dp / (self.network_gbs * 1e9)


def tp_rank_slice(decoder: DecoderConfig, tp: int, layers: int) -> ModelConfig:
    """Text-only model with the shapes one TP rank holds (heads, KV groups, ffn, vocab / tp; hidden kept)."""
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size"):
        if getattr(decoder, name) % tp:
            raise ConfigError(f"--per-rank-tp {tp}: decoder.{name}={getattr(decoder, name)} is not divisible by it")
    sliced = dataclasses.replace(
        decoder,
        num_layers=layers,
        num_attention_heads=decoder.num_attention_heads // tp,
        num_query_groups=decoder.num_query_groups // tp,
        ffn_hidden_size=decoder.ffn_hidden_size // tp,
        vocab_size=decoder.vocab_size // tp,
    )
    return _text_only(sliced)


def _text_only(decoder: DecoderConfig) -> ModelConfig:
    return ModelConfig(decoder, None, None, 4, "voxtral")


def tiny_decoder() -> DecoderConfig:
    """Small Mistral-like decoder for the CPU dry run (its heads and KV groups divide by 4)."""
    return DecoderConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=256,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=16,
        vocab_size=1024,
        max_position_embeddings=4096,
        rope=RopeConfig(theta=1e6),
    )


def _shapes(tp: int, layers: int, seq_length: int, docs: int, decoder: DecoderConfig) -> dict[str, Any]:
    lens = [seq_length // docs] * docs
    supervised = sum(n // 2 for n in lens)  # synthetic_batch supervises each document's second half
    rank = tp_rank_slice(decoder, tp, layers)
    full_rank = tp_rank_slice(decoder, tp, FULL_LAYERS)
    return {
        "rank_cfg": rank,
        "lens": lens,
        "supervised": supervised,
        "rank_flops": step_flops(rank, lens, supervised, 0),
        "rank_flops_40": step_flops(full_rank, lens, supervised, 0),
        "model_flops_40": step_flops(
            _text_only(dataclasses.replace(decoder, num_layers=FULL_LAYERS)), lens, supervised, 0
        ),
        "shard_params": _params(full_rank),
    }


def _params(cfg: ModelConfig) -> float:
    """Parameters of one TP shard: the layers' matmuls, embedding and LM-head shards (norms are negligible)."""
    return float(decoder_matmul_params(cfg) + 2 * cfg.decoder.vocab_size * cfg.decoder.hidden_size)


def project(
    measured_step_s: float, shapes: dict[str, Any], tp: int, gpus: int, global_batch: int, comm: CommModel
) -> dict[str, float]:
    """Step time and throughput of the 40-layer model on `gpus` GPUs at TP=`tp` (DP = gpus / tp, PP = 1)."""
    dp = gpus // tp
    micro = global_batch // dp  # sequences per DP rank per step
    compute = measured_step_s * shapes["rank_flops_40"] / shapes["rank_flops"]
    d = shapes["rank_cfg"].decoder
    seq = sum(shapes["lens"])
    tp_comm = comm.tp_seconds(tp, seq, shapes["supervised"], d.hidden_size, FULL_LAYERS, recompute=True)
    dp_comm = comm.dp_seconds(dp, shapes["shard_params"])
    step = micro * (compute + tp_comm) + dp_comm
    return {
        "gpus": gpus,
        "tp": tp,
        "dp": dp,
        "sequences_per_step": global_batch,
        "compute_s_per_sequence": compute,
        "tp_comm_s_per_sequence": tp_comm,
        "dp_comm_s": dp_comm,
        "step_s": step,
        "tokens_per_s": global_batch * seq / step,
        "model_tflops_per_gpu": shapes["model_flops_40"] * global_batch / step / gpus / 1e12,
    }


def plan(tp: int, layers: int, seq_length: int, docs: int, gpus: int = 128, tiny: bool = False) -> dict[str, Any]:
    """What the per-rank run will do and the communication model's terms (no GPU needed)."""
    decoder = tiny_decoder() if tiny else slice_config(FULL_LAYERS, 0).decoder
    shapes = _shapes(tp, layers, seq_length, docs, decoder)
    d = shapes["rank_cfg"].decoder
    comm = CommModel()
    return {
        "rank_shapes": {
            "layers": d.num_layers,
            "hidden": d.hidden_size,
            "query_heads": d.num_attention_heads,
            "kv_heads": d.num_query_groups,
            "ffn": d.ffn_hidden_size,
            "vocab": d.vocab_size,
        },
        "tokens_per_step": seq_length,
        "documents": docs,
        "model_tflop_per_step": shapes["rank_flops"] / 1e12,
        "comm_model": {
            **dataclasses.asdict(comm),
            "tp_bytes_per_collective_per_gpu": seq_length * d.hidden_size * 2 * (tp - 1) / tp,
            "tp_collectives_per_layer": 12,
            "tp_s_per_sequence_40_layers": comm.tp_seconds(
                tp, seq_length, shapes["supervised"], d.hidden_size, FULL_LAYERS, True
            ),
            "dp_bytes_per_step_per_gpu": 6 * shapes["shard_params"] * (gpus // tp - 1) / (gpus // tp),
        },
    }


def per_rank(
    tp: int = 4,
    layers: int = 8,
    seq_length: int = 131072,
    docs: int = 4,
    steps: int = 3,
    warmup: int = 1,
    gpus: int = 128,
    global_batch: int = 32,
    cpu: bool = False,
) -> dict[str, Any]:
    """Measure BF16 and FP8 (tensorwise) steps of one TP rank's slice and project them to `gpus` GPUs.
    `cpu`: tiny shapes through the same code on CPU (fp32, no FP8), to check the path without a GPU."""
    decoder = tiny_decoder() if cpu else slice_config(FULL_LAYERS, 0).decoder
    shapes = _shapes(tp, layers, seq_length, docs, decoder)
    comm = CommModel()
    out: dict[str, Any] = {"plan": plan(tp, layers, seq_length, docs, gpus, tiny=cpu)}
    for name, fp8 in PRECISIONS.items():
        gc.collect()  # the previous run's model and optimizer (reference cycles through their config)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        measured = run(
            seq_length=seq_length,
            docs=docs,
            audio_chunks=0,
            steps=steps,
            warmup=warmup,
            fp8=fp8,
            recompute="full",
            model_cfg=shapes["rank_cfg"],
            fp8_recipe="tensorwise",
            cpu=cpu,
        )
        measured["projection"] = project(measured["step_s"], shapes, tp, gpus, global_batch, comm)
        out[name] = measured
    return out
