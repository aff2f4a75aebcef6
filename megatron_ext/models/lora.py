"""LoRA adapters on Megatron-Core's parallel linears: y = W x + (alpha / rank) B A x with W frozen.

Each adapter shards the way its layer does, so its output lands where the layer's does:
- ColumnParallelLinear (W split on output rows): A [rank, in] replicated, B [out/TP, rank] split on rows.
  h = A x is the same on every TP rank, but each rank's B shard gives only part of dh, so h passes
  `copy_to_tensor_model_parallel_region` (gradient all-reduced). Under sequence parallelism x is a sequence
  shard: h (rank wide, not hidden wide) is all-gathered along the sequence instead, and A's gradient, a
  per-rank partial sum, is all-reduced like the layer norms' (`sequence_parallel` attribute).
- RowParallelLinear (W split on input columns): A [rank, in/TP] split on columns, B [out, rank] replicated.
  The partial A_i x_i are summed over TP (reduce-scattered along the sequence under sequence parallelism,
  where B's gradient is then a partial sum, all-reduced as above).
A is initialised like nn.Linear (uniform, bound 1/sqrt(in)) from a generator seeded by the run's seed and the
layer's global name (the same A at any TP/PP), B with zeros: until the first update the wrapped model
computes exactly what the base model does. The checkpoint keys are the layer's with `lora_a`/`lora_b` for
`weight` (`checkpoint/lora.py`); B of SwiGLU's fc1 is saved in the weight's [gate; up] layout.
"""

from __future__ import annotations

import zlib
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_ext.checkpoint.lora_layout import DECODER_TARGETS
from megatron_ext.errors import ProjectError

ADAPTER_PARAMS = ("lora_a", "lora_b")


class LoraError(ProjectError, ValueError):
    """A layer cannot carry a LoRA adapter (backend or layout)."""


class LoraLinear(torch.nn.Module):
    """A frozen Megatron-Core Column/RowParallelLinear (`base`) plus a trainable low-rank update."""

    def __init__(
        self, base: torch.nn.Module, name: str, rank: int, alpha: float, dropout: float, seed: int, swiglu: bool
    ) -> None:
        super().__init__()
        if isinstance(base, ColumnParallelLinear) and not base.gather_output:
            self.column = True
        elif isinstance(base, RowParallelLinear) and base.input_is_parallel:
            self.column = False
        else:
            raise LoraError(
                f"{name}: LoRA wraps Megatron-Core's local ColumnParallelLinear (no gathered output) or "
                f"RowParallelLinear (parallel input), not {type(base).__name__}; use model.transformer_impl: local"
            )
        self.base, self.scale, self.swiglu = base, alpha / rank, swiglu
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else None
        tp, tp_rank = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank(),
        )
        weight = base.weight
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        bound = base.input_size**-0.5
        a = (torch.rand(rank, base.input_size, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        if self.column:
            b_rows = base.output_size_per_partition
        else:
            per = base.input_size_per_partition
            a, b_rows = a[:, tp_rank * per : (tp_rank + 1) * per], base.output_size
        self.lora_a = torch.nn.Parameter(a.to(weight.dtype).to(weight.device).contiguous())
        self.lora_b = torch.nn.Parameter(torch.zeros(b_rows, rank, dtype=weight.dtype, device=weight.device))
        sharded, replicated = (self.lora_b, self.lora_a) if self.column else (self.lora_a, self.lora_b)
        set_tensor_model_parallel_attributes(sharded, True, 0 if self.column else 1, 2 if swiglu else 1)
        self.tp, self.sequence_parallel = tp, base.sequence_parallel and tp > 1
        if self.sequence_parallel:
            replicated.sequence_parallel = True  # its gradient is a partial sum per rank: all-reduced over TP

    def forward(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, bias = self.base(x, *args, **kwargs)
        if self.dropout is not None:
            if self.column:  # x is the same on every TP rank (no SP), and so is the default generator's mask
                x = self.dropout(x)
            else:  # x is this rank's slice of the features: at TP > 1 a mask of its own (model-parallel RNG)
                with tensor_parallel.get_cuda_rng_tracker().fork() if self.tp > 1 else nullcontext():
                    x = self.dropout(x)
        h = F.linear(x, self.lora_a)
        if self.column:
            h = (
                tensor_parallel.gather_from_sequence_parallel_region(h)
                if self.sequence_parallel
                else tensor_parallel.copy_to_tensor_model_parallel_region(h)
            )
        else:
            h = (
                tensor_parallel.reduce_scatter_to_sequence_parallel_region(h)
                if self.sequence_parallel
                else tensor_parallel.reduce_from_tensor_model_parallel_region(h)
            )
        return out + self.scale * F.linear(h, self.lora_b), bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """The base layer's entries under its own keys plus `lora_a`/`lora_b` sharded as above."""
        state = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        axis = {"lora_b": 0} if self.column else {"lora_a": 1}
        adapters = {"lora_a": self.lora_a, "lora_b": self.lora_b}
        state.update(make_sharded_tensors_for_checkpoint(adapters, prefix, axis, sharded_offsets))
        if self.swiglu:  # B's rows follow fc1's per-rank [gate_r; up_r]: saved as the full [gate; up]
            singleton = (metadata or {}).get("singleton_local_shards", False)
            state[prefix + "lora_b"] = apply_swiglu_sharded_factory(
                state[prefix + "lora_b"], sharded_offsets, singleton
            )
        return state


def _sites(model: torch.nn.Module, targets: list[str]) -> list[tuple[str, torch.nn.Module, str, bool]]:
    """(global name, parent module, attribute, SwiGLU fc1) of every linear the targets name on this rank."""
    sites = []
    decoder = model.language_model.decoder
    for layer in decoder.layers:
        prefix = f"language_model.decoder.layers.{layer.layer_number - 1}."  # global layer index under PP
        for t in DECODER_TARGETS:
            if t in targets:
                parent = layer.self_attention if t in ("linear_qkv", "linear_proj") else layer.mlp
                module = "self_attention" if parent is layer.self_attention else "mlp"
                gated = t == "linear_fc1" and parent.config.gated_linear_unit
                sites.append((f"{prefix}{module}.{t}", parent, t, gated))
    if "projector" in targets and model.audio_projector is not None:
        mlp = model.audio_projector.encoder
        sites += [(f"audio_projector.encoder.{t}", mlp, t, False) for t in ("linear_fc1", "linear_fc2")]
    return sites


def apply_lora(
    model: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: list[str], seed: int
) -> list[str]:
    """Freeze every weight of `model` (an AudioLanguageModel, base weights loaded) and wrap the targeted
    linears with adapters, the only trainable parameters; returns the wrapped layers' global names."""
    model.requires_grad_(False)
    names = []
    for name, parent, attr, gated in _sites(model, targets):
        setattr(parent, attr, LoraLinear(getattr(parent, attr), name, rank, alpha, dropout, seed, gated))
        names.append(name)
    if model.audio_projector is not None:  # the projector's forward needs autograd exactly when it has adapters
        model.freeze_projector = "projector" not in targets
    return names


def is_adapter_key(key: str) -> bool:
    """True for a (sharded) state-dict key of an adapter tensor."""
    return key.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model: TP shards counted TP times, PP stages summed."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    counts = torch.zeros(2, dtype=torch.float64)
    for p in model.parameters():
        n = p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
        counts += torch.tensor([n if p.requires_grad else 0, n], dtype=torch.float64)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        counts = counts.to(next(model.parameters()).device)
        torch.distributed.all_reduce(counts, group=parallel_state.get_pipeline_model_parallel_group())
    trainable, total = counts.cpu().tolist()
    return int(trainable), int(total)
