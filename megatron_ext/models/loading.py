"""Load full (unsharded) Megatron tensors, named as in `checkpoint/mapping.py`, into a model at any TP/PP rank.

The model's own `sharded_state_dict()` says, for every local tensor, its checkpoint key (TE naming, layers
stacked along a leading axis) and where the local shard sits in the full tensor; SwiGLU's fc1 comes as a
factory that splits the local [gate_r; up_r] into its two pieces. So one loop covers TP splits, PP layer
offsets and both specs, and a tensor is read only if this rank holds part of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_ext.checkpoint.source import open_checkpoint
from megatron_ext.config import ModelConfig
from megatron_ext.errors import ProjectError

Getter = Callable[[str], torch.Tensor]


class LoadError(ProjectError, ValueError):
    """A checkpoint tensor is missing or has the wrong shape for this model."""


def _sharded_tensors(sharded: dict) -> Iterator[ShardedTensor]:
    for value in sharded.values():
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from (built if isinstance(built, list) else built.values() if isinstance(built, dict) else [built])
        elif isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, dict):
            yield from _sharded_tensors(value)


def full_name(sh: ShardedTensor) -> str:
    """Contract name of the full tensor a shard belongs to (unstacks `layers.` with the layer offset)."""
    if sh.prepend_axis_num == 0:
        return sh.key
    if sh.prepend_axis_num != 1 or ".layers." not in sh.key:
        raise LoadError(f"{sh.key}: unexpected stacked layout (prepend_axis_num={sh.prepend_axis_num})")
    head, tail = sh.key.split(".layers.", 1)
    return f"{head}.layers.{sh.global_offset[0]}.{tail}"


def load_full_tensors(model: torch.nn.Module, get: Getter) -> int:
    """Copy this rank's shard of every full tensor `get(name)` into `model`; returns the tensors read."""
    params = {p.data_ptr(): (name, p) for name, p in model.named_parameters()}
    covered: dict[str, int] = {}
    n = 0
    with torch.no_grad():
        for sh in _sharded_tensors(model.sharded_state_dict()):
            name = full_name(sh)
            try:
                full = get(name)
            except KeyError:
                raise LoadError(f"checkpoint has no tensor {name}") from None
            expected = tuple(sh.global_shape[sh.prepend_axis_num :])
            if tuple(full.shape) != expected:
                raise LoadError(f"{name}: checkpoint shape {tuple(full.shape)}, model expects {expected}")
            offsets = sh.global_offset[sh.prepend_axis_num :]
            index = tuple(slice(o, o + s) for o, s in zip(offsets, sh.local_shape, strict=True))
            sh.data.copy_(full[index])
            base = sh.data._base if sh.data._base is not None else sh.data
            owner = params.get(base.data_ptr())
            if owner is not None:
                covered[owner[0]] = covered.get(owner[0], 0) + sh.data.numel()
            n += 1
    missing = [name for name, p in model.named_parameters() if covered.get(name, 0) != p.numel()]
    if missing:
        raise LoadError(f"{len(missing)} parameters were not loaded, e.g. {missing[0]}")
    return n


def load_checkpoint(model: torch.nn.Module, directory: str | Path) -> ModelConfig:
    """Load a torch_dist, HF or Mistral-native checkpoint into `model` (this rank's TP/PP shard); returns its
    ModelConfig. Reads only the tensors this rank holds."""
    with open_checkpoint(Path(directory)) as source:
        load_full_tensors(model, source.megatron().get)
        return source.cfg
