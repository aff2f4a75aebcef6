"""Merge methods: pure tensor functions (linear, SLERP, DELLA) and small method classes in a registry.

Numerics follow mergekit 0.1.5 (the public reference, FACTS.md section 10) so outputs can be compared
bit for bit: float32 compute (float64 inputs stay float64), result cast to the input dtype. Large
tensors are processed in fixed 1 Mi-element chunks, which bounds scratch memory; elementwise steps are
chunk-invariant and the SLERP reductions use the same chunking as mergekit and the same split across
torch's threads (`threaded_sum`), while the chunks themselves run in parallel (`KernelPool`). bf16 pairs
use fused kernels with the torch passes' bits (`bf16_kernels`).
DELLA draws from a per-tensor generator seeded by (seed, tensor name), so a result does not depend on
the order tensors are processed in (resumable, parallel-safe), unlike a global generator.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from megatron_ext.merge import bf16_kernels
from megatron_ext.merge.kernel_pool import KernelPool

CHUNK = 1024 * 1024
GRAIN = 32768  # at::internal::GRAIN_SIZE: torch splits a reduction across threads above this size
LINEAR_CHUNK = 256 * 1024  # elementwise only: any chunking gives the same bits; chunks stay in L2
DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
RescaleNorm = Literal["l1", "l2", "linf", "per_weight"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunks(n: int, size: int = CHUNK) -> Iterator[slice]:
    return (slice(s, min(s + size, n)) for s in range(0, n, size))


_THREAD = threading.local()


def _scratch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's two CHUNK-element buffers of `dtype`, reused: a fresh multi-MB buffer per chunk costs
    page faults that take as long as the arithmetic."""
    bufs = _THREAD.__dict__.setdefault("scratch", {})
    if dtype not in bufs:
        bufs[dtype] = (torch.empty(CHUNK, dtype=dtype), torch.empty(CHUNK, dtype=dtype))
    return bufs[dtype]


def _load(buf: torch.Tensor, src: torch.Tensor, s: slice) -> torch.Tensor:
    """src[s] converted into the scratch buffer `buf`."""
    return buf[: s.stop - s.start].copy_(src[s])


# ---- linear -----------------------------------------------------------------------------------------
def linear(tensors: list[torch.Tensor], weights: list[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """sum(w_i x_i) / sum(w_i), accumulated in float32 in the given order, cast to the first input's dtype,
    with the roundings of mergekit's accumulation from zero with `addcmul_` (`_linear_passes`). Two bf16
    inputs take the fused kernel when it reproduces this build's `addcmul_` (checked once per process)."""
    w = torch.tensor(weights, dtype=_compute_dtype(tensors[0]))
    result = _output(tensors[0], out)
    if len(tensors) == 2 and _bf16_pair(*tensors) and _fused_linear_matches():
        bf16_kernels.linear(tensors[0], tensors[1], w[0].item(), w[1].item(), w.sum().item(), result)
    else:
        _linear_passes(tensors, w, result)
    return result


def _linear_passes(tensors: list[torch.Tensor], w: torch.Tensor, result: torch.Tensor) -> None:
    """`linear` in torch kernels: inputs converted into compute-dtype scratch before any arithmetic
    (same-dtype kernels are vectorized, mixed-dtype ones several times slower); the `+ 0.0` turns a -0
    first product into +0, as accumulating from zero does."""
    total = w.sum()
    unit = bool(total == 1)
    flat = [t.reshape(-1) for t in tensors]
    coef, first_coef, total_value = w.unbind(0), w[0].item(), total.item()  # .item(): exact in w's dtype
    dst = result.view(-1)
    acc, term = _scratch(w.dtype)
    for sl in _chunks(flat[0].numel(), LINEAR_CHUNK):
        a = _load(acc, flat[0], sl).mul_(first_coef).add_(0.0)
        for x, c in zip(flat[1:], coef[1:], strict=True):
            a.addcmul_(_load(term, x, sl), c)
        dst[sl].copy_(a if unit else a.div_(total_value))  # x / 1.0 == x bit for bit: skip that pass


@functools.cache
def _fused_linear_matches() -> bool:
    """Whether the fused bf16 linear kernel gives this torch build's bits (whether its `addcmul_` fuses the
    multiply-add depends on the CPU kernels it dispatches to): compared on mixed-scale values, with unit
    and non-unit weight sums."""
    x, y = _calibration_pair(65_536)
    for weights in ([0.9, 0.1], [0.7, 0.3], [0.6, 0.7]):
        w = torch.tensor(weights)
        reference, fused = torch.empty_like(x), torch.empty_like(x)
        _linear_passes([x, y], w, reference)
        bf16_kernels.linear(x, y, w[0].item(), w[1].item(), w.sum().item(), fused)
        if not torch.equal(fused.view(torch.int16), reference.view(torch.int16)):
            return False
    return True


def _calibration_pair(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two bf16 vectors of mixed-scale values (2^-20 to 2^20) for the fused kernels' self-checks."""
    g = torch.Generator().manual_seed(0)
    return tuple(  # type: ignore[return-value]
        (torch.randn(n, generator=g) * torch.rand(n, generator=g).mul(40).sub(20).exp2()).bfloat16() for _ in range(2)
    )


def _output(like: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`out` (checked: same shape and dtype as `like`, contiguous) or a new tensor like `like`."""
    if out is None:
        return torch.empty(like.shape, dtype=like.dtype)
    if out.shape != like.shape or out.dtype != like.dtype or not out.is_contiguous():
        raise ValueError(f"out: {out.dtype} {list(out.shape)} does not fit {like.dtype} {list(like.shape)}")
    return out


# ---- SLERP ------------------------------------------------------------------------------------------
def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (flattened); t=0 gives v0 (see `slerp_coefficients`).
    Chunks run as parallel tasks of single-threaded kernels."""
    result = _output(v0, out)
    if v0.numel() == 0:
        return result
    a, b, dst = v0.reshape(-1), v1.reshape(-1), result.view(-1)
    with KernelPool() as pool:
        ca, cb = slerp_coefficients(t, v0, v1, pool)
        pool.map(lambda s: slerp_rows(a[s], b[s], ca, cb, dst[s]), _chunks(a.numel()))
    return result


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor, pool: KernelPool) -> tuple[float, float]:
    """(ca, cb) with slerp = ca * v0 + cb * v1, from the whole (flattened, non-empty) tensors. Falls back to
    linear interpolation when the normalized vectors are (anti)collinear (|cos| > 0.9995); norms below 1e-8
    count as 1 (degenerate tensors then interpolate linearly in effect). Each 1 Mi-element chunk is a task
    of `pool`; its sums reproduce torch's split at the pool's `threads` (`threaded_sum`), as mergekit runs."""
    dt = _compute_dtype(v0)
    a, b = v0.reshape(-1), v1.reshape(-1)
    chunks = list(_chunks(a.numel(), CHUNK))
    fused = _bf16_pair(a, b) and _fused_reductions_match()
    norms = pool.map(functools.partial(_chunk_norms, a, b, fused), chunks)
    na, nb = (_norm_of_parts(torch.tensor(parts, dtype=dt)) for parts in zip(*norms, strict=True))

    def dot(s: slice) -> torch.Tensor:
        if fused:
            x, y = a[s], b[s]
            return _threaded(x.numel(), pool.threads, lambda p: bf16_kernels.products_sum(x[p], y[p], na, nb))
        xs, ys = _scratch(dt)
        return threaded_sum(_load(xs, a, s).div_(na).mul_(_load(ys, b, s).div_(nb)), pool.threads)

    total = torch.stack(pool.map(dot, chunks)).sum().clamp(-1, 1)
    tt = torch.tensor(t, dtype=dt)
    if total.abs() > DOT_THRESHOLD:
        return (1 - tt).item(), tt.item()
    theta = torch.acos(total)
    sin_theta = torch.sin(theta)
    return (torch.sin((1 - tt) * theta) / sin_theta).item(), (torch.sin(tt * theta) / sin_theta).item()


def _chunk_norms(a: torch.Tensor, b: torch.Tensor, fused: bool, s: slice) -> tuple[float, float]:
    """The float32 (float64 for float64 inputs) norms of a[s] and b[s], as torch's `vector_norm`."""
    if fused:
        return bf16_kernels.norms(a[s], b[s])
    buf = _scratch(_compute_dtype(a))[0]
    return torch.linalg.vector_norm(_load(buf, a, s)).item(), torch.linalg.vector_norm(_load(buf, b, s)).item()


@functools.cache
def _fused_reductions_match() -> bool:
    """Whether the bf16 norm and dot kernels sum as this build's single-threaded `vector_norm` and `sum` do
    (lane counts and order come from the CPU kernels torch dispatches to): compared on sizes with and
    without tails, under one intra-op thread as in a `KernelPool` task."""
    x, y = _calibration_pair(CHUNK)
    with KernelPool():  # torch single-threaded meanwhile (no-op inside a pool)
        for n in (CHUNK, CHUNK - 37, 100_003, 1_000, 5):
            u, v = x[:n], y[:n]
            if bf16_kernels.norms(u, v) != tuple(torch.linalg.vector_norm(t.float()).item() for t in (u, v)):
                return False
            if (
                bf16_kernels.products_sum(u, v, 1.37, 0.81).item()
                != ((u.float() / 1.37) * (v.float() / 0.81)).sum().item()
            ):
                return False
    return True


def _norm_of_parts(parts: torch.Tensor) -> float:
    """The norm of per-chunk norms (as mergekit), or 1.0 below the degeneracy threshold."""
    value = torch.linalg.vector_norm(parts)
    return value.item() if value > NORM_EPS else 1.0


def threaded_sum(x: torch.Tensor, threads: int) -> torch.Tensor:
    """`x.sum()` of a 1-D tensor with the bits torch gives at `threads` intra-op threads, computed with
    single-threaded kernels (call it from a `KernelPool` task)."""
    return _threaded(x.numel(), threads, lambda s: x[s].sum())


def _threaded(n: int, threads: int, piece_sum: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """A sum over n elements split as torch splits it at `threads` threads, each piece summed by
    `piece_sum` (a 0-d tensor): at::parallel_for cuts the range into min(threads, ceil(n / GRAIN)) equal
    pieces summed into per-thread slots (zero-initialized, one per thread), then sums the slots."""
    if n < GRAIN or threads == 1:
        return piece_sum(slice(0, n))
    step = -(-n // min(threads, -(-n // GRAIN)))
    slots = [piece_sum(slice(i, i + step)) for i in range(0, n, step)]
    return torch.stack(slots + [torch.zeros((), dtype=slots[0].dtype)] * (threads - len(slots))).sum()


def slerp_rows(
    v0: torch.Tensor, v1: torch.Tensor, ca: float, cb: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """ca * v0 + cb * v1 in the compute dtype, cast to v0's dtype: elementwise, so any part of the
    tensors (a row block) gives the bits of the whole."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    result = _output(v0, out)
    dst = result.view(-1)
    if _bf16_pair(a, b):
        bf16_kernels.slerp_rows(a, b, ca, cb, dst)
        return result
    xs, ys = _scratch(_compute_dtype(v0))
    for s in _chunks(a.numel(), CHUNK):
        dst[s].copy_(_load(xs, a, s).mul_(ca).add_(_load(ys, b, s).mul_(cb)))
    return result


def _bf16_pair(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both bf16: the fused kernels apply (same bits as the torch passes, a fraction of the memory traffic)."""
    return a.dtype == b.dtype == torch.bfloat16


# ---- DELLA ------------------------------------------------------------------------------------------
def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune keep probability per element: within each row, magnitude rank r=1..n (ascending) maps
    linearly onto [density-eps, density+eps]; 1-D tensors are one row."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    order = rows.abs().argsort(dim=1)
    n = rows.shape[1]
    ranks = torch.empty(order.shape, dtype=torch.float32)
    ranks.scatter_(1, order, torch.arange(n, dtype=torch.float32).expand(order.shape))  # rank of each element
    frac = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
    return ((density - epsilon) + frac * (2 * epsilon)).reshape(delta.shape)


def check_della_window(density: float, epsilon: float) -> None:
    lo, hi = density - epsilon, density + epsilon
    if not (0 < lo and hi <= 1):
        raise ValueError(f"density={density} epsilon={epsilon}: keep probabilities [{lo:g}, {hi:g}] must lie in (0, 1]")


def magprune(
    delta: torch.Tensor, density: float, epsilon: float, rescale: RescaleNorm | None, gen: torch.Generator
) -> torch.Tensor:
    """Drop delta elements at random with magnitude-ranked keep probabilities, then rescale survivors:
    `per_weight` divides each by its own p (unbiased: E[result] = delta, the DELLA paper); l1/l2/linf scale
    the whole tensor once so its norm matches the unpruned delta (mergekit 0.1.x uses l1).
    Rows are processed in blocks (ranks are per row), so scratch memory stays bounded."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    out = torch.empty(rows.shape, dtype=torch.float32)
    before = torch.zeros((), dtype=torch.float64)
    after = torch.zeros((), dtype=torch.float64)
    for sl in _chunks(rows.shape[0], max(1, CHUNK // max(1, rows.shape[1]))):
        d = rows[sl].to(torch.float32)
        p = keep_probabilities(d, density, epsilon)
        kept = d * torch.bernoulli(p, generator=gen)
        out[sl] = kept / p if rescale == "per_weight" else kept
        if rescale in ("l1", "l2", "linf"):
            before, after = _accumulate(before, d, rescale), _accumulate(after, kept, rescale)
    if rescale in ("l1", "l2", "linf"):
        if rescale == "l2":
            before, after = before.sqrt(), after.sqrt()
        if before >= 1e-7 and after >= 1e-7:
            out.mul_((before / after).to(torch.float32))
    return out.reshape(delta.shape)


def _accumulate(acc: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    """Running l1 sum, squared-l2 sum or max, across row blocks."""
    if kind == "l1":
        return acc + t.abs().sum(dtype=torch.float64)
    if kind == "l2":
        return acc + t.double().square().sum()
    return torch.maximum(acc, t.abs().max().double())


def elect_and_fuse(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Sign election by summed weighted mass, then the weighted mean of the deltas agreeing with it."""
    stacked = torch.stack([dl * w for dl, w in zip(deltas, weights, strict=True)])
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    majority = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)
    agree = (stacked.sign() == majority).to(stacked.dtype)
    divisor = (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return (stacked * agree).sum(dim=0) / divisor


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded by (seed, tensor name): results independent of processing order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


# ---- method classes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorContext:
    """What a method may know about the tensor it merges: its name, decoder layer, MLP or not."""

    name: str
    layer: int | None = None
    is_mlp: bool = False


@dataclass(frozen=True)
class MergeParams:
    """Every method parameter; validated once (`validate`) before any tensor is read."""

    method: str
    alpha: float = 0.5
    density: float = 0.5
    epsilon: float = 0.1
    lam: float = 1.0
    rescale: RescaleNorm = "l1"
    seed: int = 0
    # DELLA "advanced schedule": MLP tensors keep more (density + mlp_density_boost); the first
    # `early_layers` decoder blocks merge more conservatively (lambda * early_lambda_scale).
    mlp_density_boost: float = 0.0
    early_layers: int = 0
    early_lambda_scale: float = 1.0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {', '.join(METHODS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha}: must lie in [0, 1]")
        if self.method == "della":
            if self.rescale not in ("l1", "l2", "linf", "per_weight"):
                raise ValueError(f"rescale={self.rescale!r}: expected l1, l2, linf or per_weight")
            check_della_window(self.density, self.epsilon)
            check_della_window(self.density + self.mlp_density_boost, self.epsilon)
            if self.lam <= 0 or self.early_lambda_scale < 0 or self.early_layers < 0:
                raise ValueError("lambda must be > 0, early_lambda_scale >= 0, early_layers >= 0")

    def to_dict(self) -> dict:
        keys = ["method", "alpha"]
        if self.method == "della":
            keys += [
                "density",
                "epsilon",
                "lam",
                "rescale",
                "seed",
                "mlp_density_boost",
                "early_layers",
                "early_lambda_scale",
            ]
        return {k: getattr(self, k) for k in keys}


RowMerge = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (dev rows, vox rows, out)


class Method:
    """A merge method: combines Devstral's and Voxtral's version of one tensor (optionally with a base)."""

    name: ClassVar[str]
    uses_base: ClassVar[bool] = False
    rows_need_whole: ClassVar[bool] = False  # `rows` needs the whole tensors (state such as norms)

    def prepare(self) -> None:
        """Called once when a merge with this method starts (e.g. to compile kernels meanwhile)."""

    def rows(
        self,
        p: MergeParams,
        dev: torch.Tensor | None = None,
        vox: torch.Tensor | None = None,
        pool: KernelPool | None = None,
    ) -> RowMerge | None:
        """For an elementwise method, a merge of any row block of these tensors giving the whole-tensor
        merge's bits (whole-tensor state computed here from `dev`/`vox`, in `pool`, when `rows_need_whole`);
        else None."""
        return None

    def merge(
        self,
        dev: torch.Tensor,
        vox: torch.Tensor,
        base: torch.Tensor | None,
        p: MergeParams,
        ctx: TensorContext,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The merged tensor, written into `out` when given (saves a copy of large tensors)."""
        raise NotImplementedError


class Linear(Method):
    name = "linear"

    def prepare(self):
        bf16_kernels.prepare()

    def merge(self, dev, vox, base, p, ctx, out=None):
        return linear([dev, vox], [1.0 - p.alpha, p.alpha], out)

    def rows(self, p, dev=None, vox=None, pool=None):
        return lambda d, v, out: linear([d, v], [1.0 - p.alpha, p.alpha], out)


class Slerp(Method):
    name = "slerp"

    rows_need_whole = True

    def prepare(self):
        bf16_kernels.prepare()

    def merge(self, dev, vox, base, p, ctx, out=None):
        return slerp(p.alpha, dev, vox, out)

    def rows(self, p, dev=None, vox=None, pool=None):
        if dev.numel() == 0:
            return lambda d, v, out: out.copy_(d)
        ca, cb = slerp_coefficients(p.alpha, dev, vox, pool)
        return lambda d, v, out: slerp_rows(d, v, ca, cb, out)


class Della(Method):
    """Deltas against Devstral (one delta: Voxtral's), or against a common base (two deltas, weighted
    1-alpha / alpha, sign-elected); lambda scales the fused delta."""

    name = "della"
    uses_base = True

    def merge(self, dev, vox, base, p, ctx, out=None):
        density = p.density + (p.mlp_density_boost if ctx.is_mlp else 0.0)
        lam = p.lam * (p.early_lambda_scale if ctx.layer is not None and ctx.layer < p.early_layers else 1.0)
        gen = tensor_generator(p.seed, ctx.name)
        anchor = dev if base is None else base
        a32 = anchor.to(torch.float32)
        parents = [vox] if base is None else [dev, vox]
        weights = [1.0] if base is None else [1.0 - p.alpha, p.alpha]
        deltas = [magprune(x.to(torch.float32) - a32, density, p.epsilon, p.rescale, gen) for x in parents]
        fused = deltas[0] if len(deltas) == 1 else elect_and_fuse(deltas, weights)
        return _output(dev, out).copy_(a32 + lam * fused)


METHODS: dict[str, Method] = {m.name: m for m in (Linear(), Slerp(), Della())}
