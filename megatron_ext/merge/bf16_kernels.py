"""Fused single-pass linear and SLERP kernels for bfloat16 tensors (numba), bit-identical to the torch
passes.

In torch, the elementwise steps on bf16 are separate kernels (widen each input to float32 scratch, scale,
add, narrow back: six passes over memory; SLERP's dot step five before its sum), and on a memory-bound
CPU the passes, not the arithmetic, are the cost. Here each element is widened, computed and narrowed
in registers, with the same float32 operations in the same order, fusing a multiply-add exactly where
torch's kernel does (`addcmul_` in linear; numba never contracts on its own without fastmath), and
narrowed with torch's round-to-nearest-even, so the results are the torch passes' bits (NaN comes out
as torch's vectorized 0xFFFF). SLERP's norms sum squares in 8-lane float vectors as torch's
`vector_norm` does, both inputs in one loop (two independent add chains; torch's cvt + norm passes took
5x as long). Kernels release the GIL: `KernelPool` tasks run them in parallel.
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


LANES = 8  # torch's float32 vector width in `vector_norm` (one 8-lane accumulator, multiply then add)


@intrinsic
def _lane_sums_of_squares(typingctx, x, y):
    """(x's LANES lane sums, then y's) of squares over the whole groups of LANES elements of two equal-size
    contiguous bf16 bit arrays: explicit <8 x float> accumulators, since numba leaves the scalar form
    unvectorized and one dependent add chain per input would bound it; no FMA (no fast-math flags)."""
    if not all(
        isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == types.uint16 for a in (x, y)
    ):
        return None

    def codegen(context, builder, sig, args):
        arrays = [context.make_array(t)(context, builder, a) for t, a in zip(sig.args, args, strict=True)]
        i64, vf = ir.IntType(64), ir.VectorType(ir.FloatType(), LANES)
        vi16, vi32 = ir.VectorType(ir.IntType(16), LANES), ir.VectorType(ir.IntType(32), LANES)
        stop = builder.and_(arrays[0].nitems, ir.Constant(i64, -LANES))
        entry = builder.block
        head, body, done = (builder.append_basic_block(f"lane_sums.{s}") for s in ("head", "body", "done"))
        builder.branch(head)
        builder.position_at_end(head)
        i = builder.phi(i64)
        accs = [builder.phi(vf) for _ in arrays]
        builder.cbranch(builder.icmp_signed("<", i, stop), body, done)
        builder.position_at_end(body)
        steps = []
        for ary, acc in zip(arrays, accs, strict=True):
            raw = builder.load(builder.bitcast(builder.gep(ary.data, [i]), vi16.as_pointer()), align=2)
            v = builder.bitcast(builder.shl(builder.zext(raw, vi32), ir.Constant(vi32, [16] * LANES)), vf)
            steps.append(builder.fadd(acc, builder.fmul(v, v)))
        i.add_incoming(ir.Constant(i64, 0), entry)
        i.add_incoming(builder.add(i, ir.Constant(i64, LANES)), body)
        for acc, step in zip(accs, steps, strict=True):
            acc.add_incoming(ir.Constant(vf, [0.0] * LANES), entry)
            acc.add_incoming(step, body)
        builder.branch(head)
        builder.position_at_end(done)
        lanes = [builder.extract_element(acc, ir.Constant(ir.IntType(32), j)) for acc in accs for j in range(LANES)]
        return context.make_tuple(builder, sig.return_type, lanes)

    return types.UniTuple(types.float32, 2 * LANES)(x, y), codegen


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


@njit(nogil=True, cache=True)
def _norms(x, y):
    lanes = _lane_sums_of_squares(x, y)
    ta, tb = lanes[0], lanes[LANES]
    for j in range(1, LANES):
        ta += lanes[j]
        tb += lanes[LANES + j]
    for i in range(x.size - x.size % LANES, x.size):
        va, vb = _widen(x[i]), _widen(y[i])
        ta += va * va
        tb += vb * vb
    return np.sqrt(ta), np.sqrt(tb)


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


def norms(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(||x||, ||y||) of two equal-size bf16 tensors in float32, summed as torch's `vector_norm` of their
    float32 copies does on a CPU with 8-lane float vectors (lane sums in order, then the tail, then sqrt);
    the caller checks that this build does."""
    na, nb = _norms(_bits(x), _bits(y))
    return float(na), float(nb)


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
    _norms(x, x)
