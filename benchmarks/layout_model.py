"""Memory and throughput model of the recipe's 128k-token step per parallel layout (TP x CP x DP = 128 GPUs).

The terms of the README's TP4 x DP32 estimate, per GPU, with full recompute and sequence parallelism:
- states: the TP shard's bf16 weights and fp32 main grads (`grad_reduce_in_fp32`), plus the distributed
  optimizer's fp32 master copy and Adam moments (12 B/parameter) sharded over the DP x CP ranks;
- the frozen encoder's bf16 weights: split over TP, or whole on every rank (`encoder_parallel: replicate`);
- checkpointed activations: every layer's bf16 input, [s / (TP x CP), hidden];
- one layer's recompute: FACTS' 8.5 GB per layer at s = 131072 on TP4, scaled by the tokens per GPU;
- the chunked loss: 1.6 GB at TP4 (vocab / TP columns per chunk), scaled by 4 / TP;
- CP's ring attention: one remote K/V block in flight, double-buffered.
Time per step: compute at an assumed model TFLOP/s per GPU (FACTS' 475 target; the per-rank GPU measurement is
pending), `sft_per_rank.CommModel`'s TP and DP terms (TP collectives over the rank's s / CP tokens; the
optimizer's reduce-scatter/all-gather over DP x CP), and CP's K/V ring over NVLink: per layer, forward,
recomputed forward and backward (K/V and their gradients) pass cp - 1 blocks each; no overlap assumed.
"""

from __future__ import annotations

import dataclasses
import math

from benchmarks.sft_gpu import slice_config
from benchmarks.sft_per_rank import FULL_LAYERS, CommModel
from megatron_ext.checkpoint.shapes import encoder_shapes
from megatron_ext.training.metrics import decoder_matmul_params, step_flops

GB = 1e9
SEQ, DOCS, GLOBAL_BATCH, GPUS = 131072, 4, 32, 128
RECOMPUTE_LAYER_GB_TP4 = 8.5  # FACTS section 7: one layer's activations at s = 131072, TP4 + SP
LOSS_GB_TP4 = 1.6  # README: the chunked LM head + cross entropy peak at TP4
TARGET_TFLOPS = 475.0  # FACTS section 7: the layout's target model TFLOP/s per GPU


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    cp: int = 1
    encoder: str = "split"  # split | replicate
    gpus: int = GPUS

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.cp)

    @property
    def name(self) -> str:
        return f"TP{self.tp}-CP{self.cp}" + (" (encoder replicated)" if self.encoder == "replicate" else "")


def memory_gb(layout: Layout) -> dict[str, float]:
    """Per-GPU memory terms (GB) and their total."""
    cfg = slice_config(FULL_LAYERS, 32)
    d = cfg.decoder
    projector = cfg.projector_input_size * d.hidden_size + d.hidden_size**2
    trainable = decoder_matmul_params(cfg) + 2 * d.vocab_size * d.hidden_size + projector
    encoder = sum(math.prod(shape) for name, shape in encoder_shapes(cfg).items() if name.startswith("audio_tower."))
    shard, tokens = trainable / layout.tp, SEQ / (layout.tp * layout.cp)
    terms = {
        "weights_and_grads": (2 + 4) * shard / GB,
        "optimizer": 12 * shard / (layout.dp * layout.cp) / GB,
        "encoder": 2 * encoder / (1 if layout.encoder == "replicate" else layout.tp) / GB,
        "checkpointed_activations": FULL_LAYERS * tokens * d.hidden_size * 2 / GB,
        "layer_recompute": RECOMPUTE_LAYER_GB_TP4 * tokens / (SEQ / 4),
        "loss": LOSS_GB_TP4 * 4 / layout.tp,
        "cp_ring": 2 * _kv_block_bytes(layout) / GB if layout.cp > 1 else 0.0,
    }
    return terms | {"total": sum(terms.values())}


def _kv_block_bytes(layout: Layout) -> float:
    """One CP rank's bf16 K and V for its s / CP tokens and KV heads / TP."""
    d = slice_config(FULL_LAYERS, 0).decoder
    return SEQ / layout.cp * 2 * (d.num_query_groups / layout.tp) * d.kv_channels * 2


def step_seconds(layout: Layout, comm: CommModel | None = None, tflops: float = TARGET_TFLOPS) -> dict[str, float]:
    """Step time terms (s) and throughput for GLOBAL_BATCH sequences of SEQ tokens (DOCS documents each)."""
    comm = comm or CommModel()
    cfg = slice_config(FULL_LAYERS, 0)
    d = cfg.decoder
    lens = [SEQ // DOCS] * DOCS
    supervised = sum(n // 2 for n in lens)
    flops = step_flops(cfg, lens, supervised, 0)  # one sequence, fwd + bwd
    sequences = GLOBAL_BATCH / layout.dp  # per DP group, one after the other
    compute = flops / (layout.tp * layout.cp) / (tflops * 1e12)
    tp_comm = comm.tp_seconds(
        layout.tp, SEQ // layout.cp, supervised // layout.cp, d.hidden_size, FULL_LAYERS, recompute=True
    )
    cp_comm = FULL_LAYERS * 4 * (layout.cp - 1) * _kv_block_bytes(layout) / (comm.nvlink_gbs * 1e9)
    shard = (decoder_matmul_params(cfg) + 2 * d.vocab_size * d.hidden_size) / layout.tp
    dp_comm = comm.dp_seconds(layout.dp * layout.cp, shard)
    step = sequences * (compute + tp_comm + cp_comm) + dp_comm
    return {
        "compute": sequences * compute,
        "tp_comm": sequences * tp_comm,
        "cp_comm": sequences * cp_comm,
        "dp_comm": dp_comm,
        "step": step,
        "tokens_per_s_per_gpu": GLOBAL_BATCH * SEQ / step / layout.gpus,
        "model_tflops_per_gpu": flops * GLOBAL_BATCH / step / layout.gpus / 1e12,
    }


LAYOUTS = (Layout(4), Layout(4, 2), Layout(8, 1, "replicate"))


def table(layouts: tuple[Layout, ...] = LAYOUTS) -> str:
    """The README's markdown table: one column per layout."""
    mem = [memory_gb(x) for x in layouts]
    time = [step_seconds(x) for x in layouts]
    rows = [
        ("DP", [str(x.dp) for x in layouts]),
        ("weights + fp32 grads (GB)", [f"{m['weights_and_grads']:.1f}" for m in mem]),
        ("optimizer states, sharded over DP x CP (GB)", [f"{m['optimizer']:.1f}" for m in mem]),
        ("frozen encoder, bf16 (GB)", [f"{m['encoder']:.2f}" for m in mem]),
        ("checkpointed activations (GB)", [f"{m['checkpointed_activations']:.1f}" for m in mem]),
        ("one layer's recompute (GB)", [f"{m['layer_recompute']:.1f}" for m in mem]),
        ("chunked loss (GB)", [f"{m['loss']:.1f}" for m in mem]),
        ("CP ring K/V buffers (GB)", [f"{m['cp_ring']:.2f}" for m in mem]),
        ("**peak per GPU (GB)**", [f"**{m['total']:.1f}**" for m in mem]),
        ("compute at 475 TFLOP/s (s/step)", [f"{t['compute']:.1f}" for t in time]),
        ("TP collectives (s/step)", [f"{t['tp_comm']:.2f}" for t in time]),
        ("CP K/V ring (s/step)", [f"{t['cp_comm']:.2f}" for t in time]),
        ("DP optimizer comm (s/step)", [f"{t['dp_comm']:.2f}" for t in time]),
        ("**step (s), no overlap**", [f"**{t['step']:.1f}**" for t in time]),
        ("tokens/s per GPU", [f"{t['tokens_per_s_per_gpu']:,.0f}" for t in time]),
        ("model TFLOP/s per GPU", [f"{t['model_tflops_per_gpu']:.0f}" for t in time]),
    ]
    head = "| 128 x H100, 32 x 131072 tokens | " + " | ".join(x.name for x in layouts) + " |"
    lines = [head, "|---" * (len(layouts) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
