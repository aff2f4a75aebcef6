"""Fused single-pass linear and SLERP kernels for bfloat16 tensors (numba), bit-identical to the torch
passes.

In torch, the elementwise steps on bf16 are separate kernels (widen each input to float32 scratch, scale,
add, narrow back: six passes over memory; SLERP's dot step five before its sum), and on a memory-bound
CPU the passes, not the arithmetic, are the cost. Here each element is widened, computed and narrowed
in registers, with the same float32 operations in the same order, fusing a multiply-add exactly where
torch's kernel does (`addcmul_` in linear; numba never contracts on its own without fastmath), and
narrowed with torch's round-to-nearest-even, so the results are the torch passes' bits (NaN comes out
as torch's vectorized 0xFFFF). Kernels release the GIL: `KernelPool` tasks run them in parallel.
Compiled once and cached on disk; even from the cache numba's first call takes about 0.7 s, which
`prepare` overlaps with the merge's start.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _f32_from_bits(typingctx, bits):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of_f32(typingctx, value):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    def codegen(context, builder, sig, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(inline="always")
def _widen(h):
    return _f32_from_bits(np.uint32(h) << np.uint32(16))


@njit(inline="always")
def _narrow(f):
    if f != f:
        return np.uint16(0xFFFF)
    u = _bits_of_f32(f)
    return np.uint16((u + ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> np.uint32(16))


@njit(nogil=True, cache=True)
def _rows(x, y, ca, cb, out):
    a, b = np.float32(ca), np.float32(cb)
    for i in range(out.size):
        out[i] = _narrow(a * _widen(x[i]) + b * _widen(y[i]))


@njit(nogil=True, cache=True)
def _products(x, y, na, nb, out):
    a, b = np.float32(na), np.float32(nb)
    for i in range(out.size):
        out[i] = (_widen(x[i]) / a) * (_widen(y[i]) / b)


@njit(nogil=True, cache=True)
def _linear(x, y, w0, w1, total, out):
    a, b, t = np.float32(w0), np.float32(w1), np.float32(total)
    for i in range(out.size):
        acc = _fma(_widen(y[i]), b, _fma(_widen(x[i]), a, np.float32(0)))
        out[i] = _narrow(acc if total == 1.0 else acc / t)


def _bits(t: torch.Tensor) -> np.ndarray:
    """The raw 16-bit patterns of a contiguous bf16 tensor, sharing its memory."""
    return t.reshape(-1).view(torch.int16).numpy().view(np.uint16)


def slerp_rows(x: torch.Tensor, y: torch.Tensor, ca: float, cb: float, out: torch.Tensor) -> None:
    """out = bf16(fp32(ca * x) + fp32(cb * y)) elementwise; ca, cb are float32 values."""
    _rows(_bits(x), _bits(y), ca, cb, _bits(out))


def linear(x: torch.Tensor, y: torch.Tensor, w0: float, w1: float, total: float, out: torch.Tensor) -> None:
    """out = bf16(fma(y, w1, fma(x, w0, 0)) / total) elementwise (no division when total is 1): torch's
    accumulation with `addcmul_`, where this build fuses the multiply-add; the caller checks that it does."""
    _linear(_bits(x), _bits(y), w0, w1, total, _bits(out))


def normalized_products(x: torch.Tensor, y: torch.Tensor, na: float, nb: float, out: torch.Tensor) -> torch.Tensor:
    """out (float32, x's size) = (x / na) * (y / nb) elementwise in float32; na, nb are float32 values."""
    _products(_bits(x), _bits(y), na, nb, out.numpy())
    return out


_preparing: threading.Thread | None = None


def prepare() -> None:
    """Compile (or load from the cache) the kernels in a daemon thread, once per process; a kernel call
    meanwhile waits for it."""
    global _preparing
    if _preparing is None:
        _preparing = threading.Thread(target=_compile, name="bf16-kernels", daemon=True)
        _preparing.start()


def _compile() -> None:
    x = np.zeros(1, dtype=np.uint16)
    _rows(x, x, 0.0, 0.0, x.copy())
    _linear(x, x, 0.5, 0.5, 1.0, x.copy())
    _products(x, x, 1.0, 1.0, np.zeros(1, dtype=np.float32))
