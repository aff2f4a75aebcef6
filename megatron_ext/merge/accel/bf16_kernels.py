"""Fused single-pass linear and SLERP kernels for bfloat16 tensors, bit-identical to the torch passes.

In torch, the elementwise steps on bf16 are separate kernels (widen each input to float32 scratch, scale,
add, narrow back: six passes over memory; SLERP's dot step five before its sum), and on a memory-bound
CPU the passes, not the arithmetic, are the cost. Here each element is widened, computed and narrowed
in registers, with the same float32 operations in the same order, fusing a multiply-add exactly where
torch's kernel does (`addcmul_` in linear; LLVM never contracts on its own without fast-math flags), and
narrowed with torch's round-to-nearest-even, so the results are the torch passes' bits (NaN comes out
as torch's vectorized 0xFFFF). SLERP's reductions add in torch's order too: the norms sum squares in
8-lane float vectors as `vector_norm` does, both inputs in one loop (two independent add chains; torch's
cvt + norm passes took 5x as long), and the dot sums its products as torch's cascade `sum` would sum
the products tensor, which is never written.

The kernels are LLVM IR written here with llvmlite's builder, compiled for the host CPU and called
through ctypes, which releases the GIL: `KernelPool` tasks run them in parallel. The object code is
cached on disk (keyed by this file, the CPU and LLVM's version), so a process loads the kernels in
milliseconds; numba, which loaded them from its cache in about 0.7 s of GIL-bound work (its typing
and lowering registries, scipy through its BLAS check), delayed the merge's first SLERP pass as long.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from llvmlite import binding as llvm
from llvmlite import ir

from megatron_ext.user_cache import cache_dir

LANES = 8  # torch's float32 vector width here (`vector_norm`, `sum`: checked at run time by the callers)
ROW = 4 * LANES  # torch's sum adds 4 vectors per step (4-way ILP)
_WIDE = 16  # lanes of the elementwise and flag loops (any width gives the same bits)
_F32, _I16, _I32, _I64 = ir.FloatType(), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_P16, _PF = _I16.as_pointer(), _F32.as_pointer()


def _vec(scalar: ir.Type, lanes: int) -> ir.Type:
    return scalar if lanes == 1 else ir.VectorType(scalar, lanes)


def _const(scalar: ir.Type, value: int | float, lanes: int) -> ir.Constant:
    return ir.Constant(scalar, value) if lanes == 1 else ir.Constant(ir.VectorType(scalar, lanes), [value] * lanes)


def _splat(b: ir.IRBuilder, value: ir.Value, lanes: int) -> ir.Value:
    if lanes == 1:
        return value
    vec = ir.Constant(ir.VectorType(value.type, lanes), ir.Undefined)
    for j in range(lanes):
        vec = b.insert_element(vec, value, ir.Constant(_I32, j))
    return vec


def _intrinsic(b: ir.IRBuilder, name: str, lanes: int, *args: ir.Value) -> ir.Value:
    """Call llvm.<name> (fma, sqrt) on float32 scalars or vectors."""
    ty = _vec(_F32, lanes)
    full = f"llvm.{name}.{'f32' if lanes == 1 else f'v{lanes}f32'}"
    fn = b.module.globals.get(full)
    if fn is None:
        fn = ir.Function(b.module, ir.FunctionType(ty, [ty] * len(args)), full)
    return b.call(fn, args)


def _bits(b: ir.IRBuilder, ptr: ir.Value, index: ir.Value, lanes: int) -> ir.Value:
    """`lanes` 16-bit patterns from element `index` of an i16 array (unaligned load)."""
    at = b.gep(ptr, [index])
    return b.load(at if lanes == 1 else b.bitcast(at, _vec(_I16, lanes).as_pointer()), align=2)


def _widened(b: ir.IRBuilder, ptr: ir.Value, index: ir.Value, lanes: int) -> ir.Value:
    """bf16 elements as float32 (exact: the bits moved to the high half)."""
    wide = b.zext(_bits(b, ptr, index, lanes), _vec(_I32, lanes))
    return b.bitcast(b.shl(wide, _const(_I32, 16, lanes)), _vec(_F32, lanes))


def _store_narrowed(b: ir.IRBuilder, value: ir.Value, ptr: ir.Value, index: ir.Value, lanes: int) -> None:
    """float32 to bf16 with round-to-nearest-even, NaN as 0xFFFF (torch's rounding), stored at `index`."""
    u = b.bitcast(value, _vec(_I32, lanes))
    odd = b.and_(b.lshr(u, _const(_I32, 16, lanes)), _const(_I32, 1, lanes))
    rounded = b.lshr(b.add(b.add(u, odd), _const(_I32, 0x7FFF, lanes)), _const(_I32, 16, lanes))
    half = b.select(
        b.fcmp_unordered("uno", value, value), _const(_I16, 0xFFFF, lanes), b.trunc(rounded, _vec(_I16, lanes))
    )
    at = b.gep(ptr, [index])
    b.store(half, at if lanes == 1 else b.bitcast(at, _vec(_I16, lanes).as_pointer()), align=2)


def _loop(b: ir.IRBuilder, start: ir.Value, stop: ir.Value, step: int | ir.Value, init: list, body: Callable):
    """Emit `for i in range(start, stop, step)` (signed compare) carrying the values `init`; `body(i, carried)`
    emits one iteration (it may branch) and returns the new values. Returns (i at exit, final values)."""
    step = ir.Constant(_I64, step) if isinstance(step, int) else step
    entry = b.block
    head, loop, done = (b.append_basic_block(f"loop.{s}") for s in ("head", "body", "done"))
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(_I64)
    carried = [b.phi(v.type) for v in init]
    b.cbranch(b.icmp_signed("<", i, stop), loop, done)
    b.position_at_end(loop)
    steps = body(i, carried)
    latch = b.block
    i.add_incoming(start, entry)
    i.add_incoming(b.add(i, step), latch)
    for phi, first, nxt in zip(carried, init, steps, strict=True):
        phi.add_incoming(first, entry)
        phi.add_incoming(nxt, latch)
    b.branch(head)
    b.position_at_end(done)
    return i, carried


def _function(module: ir.Module, name: str, ret: ir.Type, args: list[ir.Type]) -> tuple[ir.IRBuilder, list]:
    fn = ir.Function(module, ir.FunctionType(ret, args), name)
    return ir.IRBuilder(fn.append_basic_block("entry")), list(fn.args)


def _whole(b: ir.IRBuilder, n: ir.Value, lanes: int) -> ir.Value:
    """n rounded down to a multiple of `lanes` (a power of two)."""
    return b.and_(n, ir.Constant(_I64, -lanes))


def _elementwise(module: ir.Module, name: str, scalars: int, compute: Callable) -> None:
    """void name(i16* x, i16* y, float s0..., i16* out, i64 n): out = narrow(compute(widen(x), widen(y), s))
    elementwise, in _WIDE-lane vectors, then the tail one element at a time."""
    b, (x, y, *s, out, n) = _function(module, name, ir.VoidType(), [_P16, _P16, *[_F32] * scalars, _P16, _I64])

    def body(lanes: int) -> Callable:
        def emit(i, _):
            xv, yv = (_widened(b, p, i, lanes) for p in (x, y))
            _store_narrowed(b, compute(b, xv, yv, [_splat(b, v, lanes) for v in s], lanes), out, i, lanes)
            return []

        return emit

    stop = _whole(b, n, _WIDE)
    _loop(b, ir.Constant(_I64, 0), stop, _WIDE, [], body(_WIDE))
    _loop(b, stop, n, 1, [], body(1))
    b.ret_void()


def _slerp_rows(b, x, y, s, lanes):
    """ca * x + cb * y (two roundings, then the add's: no FMA), as torch's mul, mul, add."""
    return b.fadd(b.fmul(s[0], x), b.fmul(s[1], y))


def _linear_unit(b, x, y, s, lanes):
    """fma(y, w1, fma(x, w0, 0)): torch's zero-initialized accumulation with `addcmul_`."""
    return _intrinsic(b, "fma", lanes, y, s[1], _intrinsic(b, "fma", lanes, x, s[0], _const(_F32, 0.0, lanes)))


def _linear_scaled(b, x, y, s, lanes):
    """The accumulation divided by the weights' total (weights not summing to 1)."""
    return b.fdiv(_linear_unit(b, x, y, s, lanes), s[2])


def _norms(module: ir.Module) -> None:
    """void norms(i16* x, i16* y, i64 n, float* out): out = (||x||, ||y||) summed as torch's `vector_norm`:
    squares into LANES lane sums, the lanes added in order, then the tail, then sqrt (no FMA)."""
    b, (x, y, n, out) = _function(module, "norms", ir.VoidType(), [_P16, _P16, _I64, _PF])
    zero = _const(_F32, 0.0, LANES)

    def lanes_body(i, accs):
        return [
            b.fadd(acc, b.fmul(v, v)) for acc, v in zip(accs, (_widened(b, p, i, LANES) for p in (x, y)), strict=True)
        ]

    stop = _whole(b, n, LANES)
    _, accs = _loop(b, ir.Constant(_I64, 0), stop, LANES, [zero, zero], lanes_body)
    totals = []
    for acc in accs:
        total = b.extract_element(acc, ir.Constant(_I32, 0))
        for j in range(1, LANES):
            total = b.fadd(total, b.extract_element(acc, ir.Constant(_I32, j)))
        totals.append(total)

    def tail_body(i, sums):
        return [b.fadd(t, b.fmul(v, v)) for t, v in zip(sums, (_widened(b, p, i, 1) for p in (x, y)), strict=True)]

    _, totals = _loop(b, stop, n, 1, totals, tail_body)
    for k, total in enumerate(totals):
        b.store(_intrinsic(b, "sqrt", 1, total), b.gep(out, [ir.Constant(_I64, k)]))
    b.ret_void()


def _all_finite(module: ir.Module) -> None:
    """i32 all_finite(i16* x, i64 n): 1 unless some element's exponent is all ones (NaN, Inf). Vectors OR
    (bits & 0x7F80) + 0x80, whose bit 15 is set exactly for such an exponent; the tail likewise."""
    b, (x, n) = _function(module, "all_finite", _I32, [_P16, _I64])

    def body(lanes: int) -> Callable:
        def emit(i, accs):
            flags = b.add(b.and_(_bits(b, x, i, lanes), _const(_I16, 0x7F80, lanes)), _const(_I16, 0x80, lanes))
            return [b.or_(accs[0], flags)]

        return emit

    stop = _whole(b, n, _WIDE)
    _, (acc,) = _loop(b, ir.Constant(_I64, 0), stop, _WIDE, [_const(_I16, 0, _WIDE)], body(_WIDE))
    flags = b.extract_element(acc, ir.Constant(_I32, 0))
    for j in range(1, _WIDE):
        flags = b.or_(flags, b.extract_element(acc, ir.Constant(_I32, j)))
    _, (flags,) = _loop(b, stop, n, 1, [flags], body(1))
    bad = b.icmp_unsigned("!=", b.and_(flags, ir.Constant(_I16, 0x8000)), ir.Constant(_I16, 0))
    b.ret(b.select(bad, ir.Constant(_I32, 0), ir.Constant(_I32, 1)))


def _products_sum(module: ir.Module) -> None:
    """float products_sum(i16* x, i16* y, float a, float b, i64 n, i64 power): sum((x / a) * (y / b)) in the
    order of torch's single-threaded float `sum` (SumKernel.cpp: vectorized_inner_sum -> row_sum ->
    multi_row_sum): LANES-float vectors, 4 per step; after every 2^power steps the partial sums move up a
    4-level cascade; then the leftover vectors, the 4 partials, the scalar tail and the lanes, in order."""
    b, (x, y, a, d, n, power) = _function(module, "products_sum", _F32, [_P16, _P16, _F32, _F32, _I64, _I64])
    vf = _vec(_F32, LANES)
    levels = b.alloca(vf, 16)  # cascade level j, vector k at [4 * j + k]
    zero = _const(_F32, 0.0, LANES)
    slots = [b.gep(levels, [ir.Constant(_I64, k)]) for k in range(16)]
    for slot in slots:
        b.store(zero, slot)
    sa, sd = _splat(b, a, LANES), _splat(b, d, LANES)

    def product(i, lanes, ta, td):
        return b.fmul(b.fdiv(_widened(b, x, i, lanes), ta), b.fdiv(_widened(b, y, i, lanes), td))

    def add_products(first, count):
        """level 0 += products of `count` steps from element `first`, in registers."""

        def step(i, accs):
            at = b.add(first, i)
            return [
                b.fadd(acc, product(b.add(at, ir.Constant(_I64, k * LANES)), LANES, sa, sd))
                for k, acc in enumerate(accs)
            ]

        stop = b.mul(count, ir.Constant(_I64, ROW))
        _, accs = _loop(b, ir.Constant(_I64, 0), stop, ROW, [b.load(s) for s in slots[:4]], step)
        for slot, acc in zip(slots[:4], accs, strict=True):
            b.store(acc, slot)

    def move_up(level):
        for k in range(4):
            upper, lower = slots[4 * level + k], slots[4 * (level - 1) + k]
            b.store(b.fadd(b.load(upper), b.load(lower)), upper)
            b.store(zero, lower)

    steps, vectors = b.ashr(n, ir.Constant(_I64, 5)), b.ashr(n, ir.Constant(_I64, 3))
    run = b.shl(ir.Constant(_I64, 1), power)
    mask = b.sub(run, ir.Constant(_I64, 1))

    def cascade(i, _):
        add_products(b.mul(i, ir.Constant(_I64, ROW)), run)
        done = b.add(i, run)
        after = b.append_basic_block("cascade.after")
        for level in (1, 2, 3):
            move_up(level)
            if level < 3:  # up one more level only when `done` is a multiple of 2^(power * level) steps
                bits = b.shl(mask, b.mul(power, ir.Constant(_I64, level)))
                higher = b.append_basic_block(f"cascade.{level + 1}")
                b.cbranch(b.icmp_unsigned("==", b.and_(done, bits), ir.Constant(_I64, 0)), higher, after)
                b.position_at_end(higher)
        b.branch(after)
        b.position_at_end(after)
        return []

    i, _ = _loop(b, ir.Constant(_I64, 0), b.add(b.sub(steps, run), ir.Constant(_I64, 1)), run, [], cascade)
    add_products(b.mul(i, ir.Constant(_I64, ROW)), b.sub(steps, i))
    for level in (1, 2, 3):
        for k in range(4):
            b.store(b.fadd(b.load(slots[k]), b.load(slots[4 * level + k])), slots[k])
    lanes = b.bitcast(levels, _PF)

    def leftover(e, _):
        lane = b.gep(lanes, [b.and_(e, ir.Constant(_I64, LANES - 1))])
        b.store(b.fadd(b.load(lane), product(e, 1, a, d)), lane)
        return []

    _loop(b, b.mul(steps, ir.Constant(_I64, ROW)), b.mul(vectors, ir.Constant(_I64, LANES)), 1, [], leftover)
    acc = b.load(slots[0])
    for k in range(1, 4):
        acc = b.fadd(acc, b.load(slots[k]))
    _, (total,) = _loop(
        b,
        b.mul(vectors, ir.Constant(_I64, LANES)),
        n,
        1,
        [ir.Constant(_F32, 0.0)],
        lambda e, t: [b.fadd(t[0], product(e, 1, a, d))],
    )
    for j in range(LANES):
        total = b.fadd(total, b.extract_element(acc, ir.Constant(_I32, j)))
    b.ret(b.fadd(ir.Constant(_F32, 0.0), total))


def _module() -> ir.Module:
    module = ir.Module("bf16_kernels")
    _elementwise(module, "slerp_rows", 2, _slerp_rows)
    _elementwise(module, "linear_unit", 2, _linear_unit)
    _elementwise(module, "linear_scaled", 3, _linear_scaled)
    _norms(module)
    _all_finite(module)
    _products_sum(module)
    return module


_P, _F, _N = ctypes.c_void_p, ctypes.c_float, ctypes.c_int64
_SIGNATURES = {
    "slerp_rows": (None, _P, _P, _F, _F, _P, _N),
    "linear_unit": (None, _P, _P, _F, _F, _P, _N),
    "linear_scaled": (None, _P, _P, _F, _F, _F, _P, _N),
    "norms": (None, _P, _P, _N, _P),
    "all_finite": (ctypes.c_int32, _P, _N),
    "products_sum": (_F, _P, _P, _F, _F, _N, _N),
}


class _Kernels:
    """The compiled kernels as ctypes functions (calls release the GIL); the engine owns their code."""

    def __init__(self) -> None:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        cpu, features = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
        self.machine = llvm.Target.from_default_triple().create_target_machine(
            cpu=cpu, features=features, opt=3, codemodel="jitdefault"
        )
        # Keyed by this file (which writes the IR), the target and LLVM: the IR is built only to compile.
        key = hashlib.sha256(Path(__file__).read_bytes())
        key.update("\n".join([self.machine.triple, cpu, features, str(llvm.llvm_version_info)]).encode())
        self.cached = cache_dir() / f"bf16_kernels-{key.hexdigest()[:32]}.o"
        obj = self._from_cache()
        self.compiled = obj is None
        if obj is None:
            obj = self._compile()
        self.engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), self.machine)
        self.engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        self.engine.finalize_object()
        for name, (ret, *args) in _SIGNATURES.items():
            setattr(self, name, ctypes.CFUNCTYPE(ret, *args)(self.engine.get_function_address(name)))

    def _from_cache(self) -> bytes | None:
        """The cached object code, or None when missing or damaged (it is checked: LLVM would crash on it)."""
        try:
            data = self.cached.read_bytes()
        except OSError:
            return None
        return data[32:] if hashlib.sha256(data[32:]).digest() == data[:32] else None

    def _compile(self) -> bytes:
        """Optimize and compile the IR to object code, cached when the cache directory is writable."""
        source = _module()
        source.triple, source.data_layout = self.machine.triple, str(self.machine.target_data)
        module = llvm.parse_assembly(str(source))
        module.verify()
        tuning = llvm.create_pipeline_tuning_options(speed_level=3)
        passes = llvm.create_pass_builder(self.machine, tuning)
        passes.getModulePassManager().run(module, passes)
        obj = self.machine.emit_object(module)
        try:
            self.cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cached.with_name(f"{self.cached.name}.{os.getpid()}.tmp")
            tmp.write_bytes(hashlib.sha256(obj).digest() + obj)
            tmp.replace(self.cached)
        except OSError:
            pass  # a read-only cache: compile in every process (about 0.2 s)
        return obj


_lock = threading.Lock()
_loaded: _Kernels | None = None


def _kernels() -> _Kernels:
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _Kernels()
    return _loaded


def prepare() -> None:
    """Load (or compile) the kernels in a daemon thread, once per process; a kernel call meanwhile waits."""
    if _loaded is None and not _lock.locked():
        threading.Thread(target=_kernels, name="bf16-kernels", daemon=True).start()


def _data(*tensors: torch.Tensor) -> list[int]:
    """Addresses of equal-size contiguous bf16 tensors (what the kernels index)."""
    for t in tensors:
        if t.dtype != torch.bfloat16 or not t.is_contiguous() or t.numel() != tensors[0].numel():
            raise ValueError(
                f"bf16 kernels take equal-size contiguous bfloat16 tensors, got {t.dtype} {tuple(t.shape)}"
            )
    return [t.data_ptr() for t in tensors]


def slerp_rows(x: torch.Tensor, y: torch.Tensor, ca: float, cb: float, out: torch.Tensor) -> None:
    """out = bf16(fp32(ca * x) + fp32(cb * y)) elementwise; ca, cb are float32 values."""
    px, py, po = _data(x, y, out)
    _kernels().slerp_rows(px, py, ca, cb, po, out.numel())


def linear(x: torch.Tensor, y: torch.Tensor, w0: float, w1: float, total: float, out: torch.Tensor) -> None:
    """out = bf16(fma(y, w1, fma(x, w0, 0)) / total) elementwise (no division when total is 1): torch's
    accumulation with `addcmul_`, where this build fuses the multiply-add; the caller checks that it does."""
    px, py, po = _data(x, y, out)
    if total == 1.0:
        _kernels().linear_unit(px, py, w0, w1, po, out.numel())
    else:
        _kernels().linear_scaled(px, py, w0, w1, total, po, out.numel())


def all_finite(x: torch.Tensor) -> bool:
    """Whether a contiguous bf16 tensor holds no NaN or Inf: one vectorized pass over its exponent bits
    (10x faster than `aminmax`, which widens every element)."""
    (px,) = _data(x)
    return bool(_kernels().all_finite(px, x.numel()))


def norms(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(||x||, ||y||) of two equal-size bf16 tensors in float32, summed as torch's single-threaded
    `vector_norm` of their float32 copies does on a CPU with 8-lane float vectors (lane sums in order, then
    the tail, then sqrt); the caller checks that this build does."""
    out = (ctypes.c_float * 2)()
    _kernels().norms(*_data(x, y), x.numel(), ctypes.addressof(out))
    return float(out[0]), float(out[1])


def products_sum(x: torch.Tensor, y: torch.Tensor, na: float, nb: float) -> torch.Tensor:
    """sum((x / na) * (y / nb)) of two equal-size bf16 tensors as a 0-d float32 tensor, added in the order
    of torch's single-threaded `sum` of the products, with no products tensor (na, nb are float32 values;
    the caller checks that this build sums so). For at least LANES elements: below, torch's `sum` takes
    its scalar path (4 partial sums), which this kernel does not reproduce."""
    steps = x.numel() // ROW
    power = max(4, max(1, (steps - 1).bit_length()) // 4)  # torch: log2 of the cascade's run length
    return torch.tensor(_kernels().products_sum(*_data(x, y), na, nb, x.numel(), power), dtype=torch.float32)
