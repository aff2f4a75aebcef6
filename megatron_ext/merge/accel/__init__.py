"""Accelerations of the merge, behind one switch: the same bits as the plain path, in less time and memory.

What is here: fused bf16 kernels in LLVM IR compiled through llvmlite (`bf16_kernels.py`), a pool of
single-threaded torch kernels that reproduces torch's thread split where bits depend on it
(`kernel_pool.py`), and the accelerated linear and SLERP built on them, self-checked against the plain
functions of `merge/methods/` (`methods.py`). Row streaming (`merge/row_stream.py`) runs on these.
The switch: `MEGATRON_EXT_MERGE_ACCEL=0` (or `tools/merge.py --no-accel`) merges with the plain methods,
whole tensors and torch's own threading, and loads no kernel.
"""

from __future__ import annotations

import os

import torch

from megatron_ext.merge.accel import bf16_kernels
from megatron_ext.merge.accel import methods as fast
from megatron_ext.merge.accel.kernel_pool import KernelPool
from megatron_ext.merge.methods import METHODS, Method

ENV = "MEGATRON_EXT_MERGE_ACCEL"
ACCELERATED: dict[str, Method] = {m.name: m for m in (fast.Linear(), fast.Slerp())}

__all__ = ["ENV", "KernelPool", "all_finite", "enabled", "method"]


def enabled() -> bool:
    """Whether accelerations are on: unless $MEGATRON_EXT_MERGE_ACCEL is 0."""
    return os.environ.get(ENV, "1").strip() != "0"


def method(name: str) -> Method:
    """The merge method `name`: its accelerated twin when there is one and accelerations are on."""
    return ACCELERATED[name] if enabled() and name in ACCELERATED else METHODS[name]


def all_finite(t: torch.Tensor) -> bool | None:
    """Whether a contiguous bf16 tensor holds no NaN or Inf, in one pass over its exponent bits; None when
    that does not apply (other tensors, accelerations off)."""
    if not (enabled() and t.dtype == torch.bfloat16 and t.is_contiguous()):
        return None
    return bf16_kernels.all_finite(t)
