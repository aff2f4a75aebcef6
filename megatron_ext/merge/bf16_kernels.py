"""Fused single-pass linear and SLERP kernels for bfloat16 tensors (numba), bit-identical to the torch
passes.

In torch, the elementwise steps on bf16 are separate kernels (widen each input to float32 scratch, scale,
add, narrow back: six passes over memory; SLERP's dot step five before its sum), and on a memory-bound
CPU the passes, not the arithmetic, are the cost. Here each element is widened, computed and narrowed
in registers, with the same float32 operations in the same order, fusing a multiply-add exactly where
torch's kernel does (`addcmul_` in linear; numba never contracts on its own without fastmath), and
narrowed with torch's round-to-nearest-even, so the results are the torch passes' bits (NaN comes out
as torch's vectorized 0xFFFF). SLERP's reductions add in torch's order too: the norms sum squares in
8-lane float vectors as `vector_norm` does, both inputs in one loop (two independent add chains; torch's
cvt + norm passes took 5x as long), and the dot sums its products as torch's cascade `sum` would sum
the products tensor, which is never written. The vector loops are LLVM IR emitted by numba intrinsics,
since numba leaves those scalar forms unvectorized. Kernels release the GIL: `KernelPool` tasks run
them in parallel.
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


LANES = 8  # torch's float32 vector width here (`vector_norm`, `sum`: checked at run time by the callers)
ROW = 4 * LANES  # torch's sum adds 4 vectors per step (4-way ILP)
_I64, _VF = ir.IntType(64), ir.VectorType(ir.FloatType(), LANES)


def _c_arrays(dtype: types.Type, *arrays: types.Type) -> bool:
    """Whether the numba types are all contiguous 1-D arrays of `dtype` (what the vector loops index)."""
    return all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == dtype for a in arrays)


def _vector_loop(builder, stop, step, init, body):
    """Emit `for i in range(0, stop, step)` carrying the vector accumulators `init`; `body(i, accs)` emits one
    iteration and returns the new accumulators. Returns their final values."""
    entry = builder.block
    head, loop, done = (builder.append_basic_block(f"vloop.{s}") for s in ("head", "body", "done"))
    builder.branch(head)
    builder.position_at_end(head)
    i = builder.phi(_I64)
    accs = [builder.phi(v.type) for v in init]
    builder.cbranch(builder.icmp_signed("<", i, stop), loop, done)
    builder.position_at_end(loop)
    steps = body(i, accs)
    i.add_incoming(ir.Constant(_I64, 0), entry)
    i.add_incoming(builder.add(i, step), loop)
    for acc, first, nxt in zip(accs, init, steps, strict=True):
        acc.add_incoming(first, entry)
        acc.add_incoming(nxt, loop)
    builder.branch(head)
    builder.position_at_end(done)
    return accs


def _bits_vector(builder, ary, index, lanes):
    """`lanes` 16-bit patterns of the uint16 array `ary` from element `index` as an <lanes x i16> (unaligned load)."""
    vector = ir.VectorType(ir.IntType(16), lanes)
    return builder.load(builder.bitcast(builder.gep(ary.data, [index]), vector.as_pointer()), align=2)


def _widened(builder, ary, index):
    """LANES bf16 values of `ary` from element `index` as a float32 vector (unaligned load, exact)."""
    vi32 = ir.VectorType(ir.IntType(32), LANES)
    raw = _bits_vector(builder, ary, index, LANES)
    return builder.bitcast(builder.shl(builder.zext(raw, vi32), ir.Constant(vi32, [16] * LANES)), _VF)


@intrinsic
def _lane_sums_of_squares(typingctx, x, y):
    """(x's LANES lane sums, then y's) of squares over the whole groups of LANES elements of two equal-size
    contiguous bf16 bit arrays, in <8 x float> accumulators; no FMA (no fast-math flags)."""
    if not _c_arrays(types.uint16, x, y):
        return None

    def codegen(context, builder, sig, args):
        arrays = [context.make_array(t)(context, builder, a) for t, a in zip(sig.args, args, strict=True)]
        stop = builder.and_(arrays[0].nitems, ir.Constant(_I64, -LANES))

        def body(i, accs):
            widened = [_widened(builder, ary, i) for ary in arrays]
            return [builder.fadd(acc, builder.fmul(v, v)) for acc, v in zip(accs, widened, strict=True)]

        zero = ir.Constant(_VF, [0.0] * LANES)
        accs = _vector_loop(builder, stop, ir.Constant(_I64, LANES), [zero, zero], body)
        lanes = [builder.extract_element(acc, ir.Constant(ir.IntType(32), j)) for acc in accs for j in range(LANES)]
        return context.make_tuple(builder, sig.return_type, lanes)

    return types.UniTuple(types.float32, 2 * LANES)(x, y), codegen


@intrinsic
def _add_products(typingctx, acc, x, y, a, b, start, count):
    """acc[:ROW] += (x / a) * (y / b) over `count` consecutive groups of ROW elements from `start`, as four
    <8 x float> accumulators in registers (a float32 division each, then multiply, then add: torch's
    products and its sum's first cascade level, fused)."""
    if not (_c_arrays(types.float32, acc) and _c_arrays(types.uint16, x, y)):
        return None

    def codegen(context, builder, sig, args):
        acc_a, x_a, y_a = (
            context.make_array(t)(context, builder, v) for t, v in zip(sig.args[:3], args[:3], strict=True)
        )
        a, b = (context.cast(builder, v, t, types.float32) for v, t in zip(args[3:5], sig.args[3:5], strict=True))
        first, groups = (context.cast(builder, v, t, types.int64) for v, t in zip(args[5:], sig.args[5:], strict=True))
        splat = [ir.Constant(_VF, ir.Undefined), ir.Constant(_VF, ir.Undefined)]
        for j in range(LANES):
            splat = [
                builder.insert_element(v, s, ir.Constant(ir.IntType(32), j)) for v, s in zip(splat, (a, b), strict=True)
            ]
        slots = [builder.gep(builder.bitcast(acc_a.data, _VF.as_pointer()), [ir.Constant(_I64, k)]) for k in range(4)]

        def body(i, accs):
            out = []
            for k, acc in enumerate(accs):
                at = builder.add(first, builder.add(i, ir.Constant(_I64, k * LANES)))
                xs, ys = (builder.fdiv(_widened(builder, ary, at), s) for ary, s in zip((x_a, y_a), splat, strict=True))
                out.append(builder.fadd(acc, builder.fmul(xs, ys)))
            return out

        stop = builder.mul(groups, ir.Constant(_I64, ROW))
        init = [builder.load(slot, align=4) for slot in slots]
        for slot, value in zip(slots, _vector_loop(builder, stop, ir.Constant(_I64, ROW), init, body), strict=True):
            builder.store(value, slot, align=4)
        return context.get_dummy_value()

    return types.void(acc, x, y, a, b, start, count), codegen


_FLAG_LANES = 16
_VI16 = ir.VectorType(ir.IntType(16), _FLAG_LANES)


@intrinsic
def _exponent_flags(typingctx, x):
    """OR of (bits & 0x7F80) + 0x80 over the whole groups of 16 elements of a contiguous bf16 bit array:
    bit 15 is set exactly when some element's exponent is all ones (NaN or Inf)."""
    if not _c_arrays(types.uint16, x):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        exponent, carry = (ir.Constant(_VI16, [v] * _FLAG_LANES) for v in (0x7F80, 0x80))

        def body(i, accs):
            raw = _bits_vector(builder, ary, i, _FLAG_LANES)
            return [builder.or_(accs[0], builder.add(builder.and_(raw, exponent), carry))]

        stop = builder.and_(ary.nitems, ir.Constant(_I64, -_FLAG_LANES))
        zero = ir.Constant(_VI16, [0] * _FLAG_LANES)
        (acc,) = _vector_loop(builder, stop, ir.Constant(_I64, _FLAG_LANES), [zero], body)
        flags = builder.extract_element(acc, ir.Constant(ir.IntType(32), 0))
        for j in range(1, _FLAG_LANES):
            flags = builder.or_(flags, builder.extract_element(acc, ir.Constant(ir.IntType(32), j)))
        return flags

    return types.uint16(x), codegen


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


@njit(nogil=True, cache=True)
def _all_finite(x):
    if _exponent_flags(x) & 0x8000:
        return False
    for i in range(x.size - x.size % _FLAG_LANES, x.size):
        if x[i] & 0x7F80 == 0x7F80:
            return False
    return True


@njit(inline="always")
def _ceil_log2(n):
    bits = 0
    while (1 << bits) < n:
        bits += 1
    return max(bits, 1)


@njit(inline="always")
def _product(x, y, a, b, i):
    return (_widen(x[i]) / a) * (_widen(y[i]) / b)


@njit(nogil=True, cache=True)
def _products_sum(x, y, na, nb):
    # torch's single-threaded float sum (SumKernel.cpp: vectorized_inner_sum -> row_sum -> multi_row_sum):
    # vectors of LANES, 4 per step; every 2^power steps the partial sums move up a 4-level cascade; then
    # the leftover vectors, the 4 partials, the scalar tail and the lanes, each added in order.
    a, b = np.float32(na), np.float32(nb)
    n = x.size
    vectors, steps = n // LANES, n // ROW
    power = max(4, _ceil_log2(steps) // 4)
    run, mask = 1 << power, (1 << power) - 1
    acc = np.zeros(4 * ROW, dtype=np.float32)  # cascade level j at [j * ROW, (j + 1) * ROW)
    i = 0
    while i + run <= steps:
        _add_products(acc, x, y, a, b, i * ROW, run)
        i += run
        for j in range(1, 4):
            for t in range(ROW):
                acc[j * ROW + t] += acc[(j - 1) * ROW + t]
                acc[(j - 1) * ROW + t] = 0
            if i & (mask << (j * power)):
                break
    _add_products(acc, x, y, a, b, i * ROW, steps - i)
    for j in range(1, 4):
        for t in range(ROW):
            acc[t] += acc[j * ROW + t]
    for e in range(steps * ROW, vectors * LANES):
        acc[e % LANES] += _product(x, y, a, b, e)
    for k in range(1, 4):
        for t in range(LANES):
            acc[t] += acc[k * LANES + t]
    total = np.float32(0)
    for e in range(vectors * LANES, n):
        total += _product(x, y, a, b, e)
    for t in range(LANES):
        total += acc[t]
    return np.float32(0) + total


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


def all_finite(x: torch.Tensor) -> bool:
    """Whether a contiguous bf16 tensor holds no NaN or Inf: one vectorized pass over its exponent bits
    (10x faster than `aminmax`, which widens every element)."""
    return bool(_all_finite(_bits(x)))


def norms(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(||x||, ||y||) of two equal-size bf16 tensors in float32, summed as torch's single-threaded
    `vector_norm` of their float32 copies does on a CPU with 8-lane float vectors (lane sums in order, then
    the tail, then sqrt); the caller checks that this build does."""
    na, nb = _norms(_bits(x), _bits(y))
    return float(na), float(nb)


def products_sum(x: torch.Tensor, y: torch.Tensor, na: float, nb: float) -> torch.Tensor:
    """sum((x / na) * (y / nb)) of two equal-size bf16 tensors as a 0-d float32 tensor, added in the order
    of torch's single-threaded `sum` of the products, with no products tensor (na, nb are float32 values;
    the caller checks that this build sums so)."""
    return torch.tensor(_products_sum(_bits(x), _bits(y), na, nb), dtype=torch.float32)


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
    _norms(x, x)
    _products_sum(x, x, 1.0, 1.0)
    _all_finite(x)
