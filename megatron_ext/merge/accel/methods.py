"""Accelerated linear and SLERP with the bits of the plain functions in `merge/methods/`.

- bf16 pairs run fused single-pass kernels (`bf16_kernels`), each used only after a self-check against
  this torch build's plain passes (whether `addcmul_` fuses a multiply-add, how `vector_norm` and `sum`
  order their lanes depend on the CPU kernels torch dispatches to).
- SLERP's chunks run as parallel tasks of single-threaded kernels (`KernelPool`) whose sums reproduce the
  split torch makes across its threads (`threaded_sum`), so the coefficients equal the plain ones.
- `rows`: a merge of any row block giving the whole-tensor bits, for row streaming (`merge/row_stream.py`).
"""

from __future__ import annotations

import functools

import torch

import megatron_ext.merge.methods.linear as plain_linear
import megatron_ext.merge.methods.slerp as plain_slerp
from megatron_ext.merge.accel import bf16_kernels
from megatron_ext.merge.accel.kernel_pool import KernelPool, split_sum, threaded_sum
from megatron_ext.merge.methods.base import CHUNK, RowMerge, chunks, compute_dtype, output


def _bf16_pair(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.bfloat16


# ---- linear -----------------------------------------------------------------------------------------
def linear(tensors: list[torch.Tensor], weights: list[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """`methods.linear.linear`; two bf16 inputs take the fused kernel when it gives this build's bits."""
    if not (len(tensors) == 2 and _bf16_pair(*tensors) and _fused_linear_matches()):
        return plain_linear.linear(tensors, weights, out)
    w = torch.tensor(weights)
    result = output(tensors[0], out)
    bf16_kernels.linear(tensors[0], tensors[1], w[0].item(), w[1].item(), w.sum().item(), result)
    return result


@functools.cache
def _fused_linear_matches() -> bool:
    """Whether the fused bf16 linear kernel gives the plain function's bits on mixed-scale values, with
    unit and non-unit weight sums (checked once per process)."""
    x, y = _calibration_pair(65_536)
    for weights in ([0.9, 0.1], [0.7, 0.3], [0.6, 0.7]):
        w = torch.tensor(weights)
        fused = torch.empty_like(x)
        bf16_kernels.linear(x, y, w[0].item(), w[1].item(), w.sum().item(), fused)
        if not torch.equal(fused.view(torch.int16), plain_linear.linear([x, y], weights).view(torch.int16)):
            return False
    return True


def _calibration_pair(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two bf16 vectors of mixed-scale values (2^-20 to 2^20) for the fused kernels' self-checks."""
    g = torch.Generator().manual_seed(0)
    return tuple(  # type: ignore[return-value]
        (torch.randn(n, generator=g) * torch.rand(n, generator=g).mul(40).sub(20).exp2()).bfloat16() for _ in range(2)
    )


# ---- SLERP ------------------------------------------------------------------------------------------
def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`methods.slerp.slerp` with the chunks as parallel tasks of single-threaded kernels."""
    result = output(v0, out)
    if v0.numel() == 0:
        return result
    a, b, dst = v0.reshape(-1), v1.reshape(-1), result.view(-1)
    with KernelPool() as pool:
        ca, cb = slerp_coefficients(t, v0, v1, pool)
        pool.map(lambda s: slerp_rows(a[s], b[s], ca, cb, dst[s]), chunks(a.numel()))
    return result


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor, pool: KernelPool) -> tuple[float, float]:
    """`methods.slerp.slerp_coefficients`, each chunk a task of `pool` whose sums reproduce torch's split
    at the pool's `threads` (`threaded_sum`); bf16 chunks through the fused norm and dot kernels."""
    dt = compute_dtype(v0)
    a, b = v0.reshape(-1), v1.reshape(-1)
    parts = list(chunks(a.numel()))
    fused = _bf16_pair(a, b) and _fused_reductions_match()
    norms = pool.map(functools.partial(_chunk_norms, a, b, fused), parts)
    na, nb = (plain_slerp.norm_of_parts(torch.tensor(n, dtype=dt)) for n in zip(*norms, strict=True))

    def dot(s: slice) -> torch.Tensor:
        x, y = a[s], b[s]
        if fused and x.numel() >= bf16_kernels.LANES:  # below a vector, torch sums in 4 scalar partials
            return split_sum(x.numel(), pool.threads, lambda p: bf16_kernels.products_sum(x[p], y[p], na, nb))
        return threaded_sum((x.to(dt) / na) * (y.to(dt) / nb), pool.threads)

    return plain_slerp.coefficients(t, torch.stack(pool.map(dot, parts)).sum())


def _chunk_norms(a: torch.Tensor, b: torch.Tensor, fused: bool, s: slice) -> tuple[float, float]:
    """The compute-dtype norms of a[s] and b[s], as torch's `vector_norm`."""
    if fused:
        return bf16_kernels.norms(a[s], b[s])
    dt = compute_dtype(a)
    return torch.linalg.vector_norm(a[s].to(dt)).item(), torch.linalg.vector_norm(b[s].to(dt)).item()


@functools.cache
def _fused_reductions_match() -> bool:
    """Whether the bf16 norm and dot kernels sum as this build's single-threaded `vector_norm` and `sum` do,
    on sizes with and without tails, under one intra-op thread as in a `KernelPool` task."""
    x, y = _calibration_pair(CHUNK)
    with KernelPool():  # torch single-threaded meanwhile (no-op inside a pool)
        for n in (CHUNK, CHUNK - 37, 100_003, 1_000, 13):
            u, v = x[:n], y[:n]
            if bf16_kernels.norms(u, v) != tuple(torch.linalg.vector_norm(t.float()).item() for t in (u, v)):
                return False
            if (
                bf16_kernels.products_sum(u, v, 1.37, 0.81).item()
                != ((u.float() / 1.37) * (v.float() / 0.81)).sum().item()
            ):
                return False
    return True


def slerp_rows(
    v0: torch.Tensor, v1: torch.Tensor, ca: float, cb: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`methods.slerp.slerp_rows`; bf16 pairs through the fused kernel."""
    if not _bf16_pair(v0, v1):
        return plain_slerp.slerp_rows(v0, v1, ca, cb, out)
    result = output(v0, out)
    bf16_kernels.slerp_rows(v0.reshape(-1), v1.reshape(-1), ca, cb, result.view(-1))
    return result


# ---- the accelerated method classes -----------------------------------------------------------------
class Linear(plain_linear.Linear):
    """`methods.linear.Linear` through the fused kernel, with `rows` for row streaming."""

    rows_need_whole = False  # `rows` needs no whole-tensor state

    def prepare(self) -> None:
        bf16_kernels.prepare()

    def merge(self, dev, vox, base, p, ctx, out=None):
        return linear([dev, vox], self.weights(p), out)

    def rows(self, p, dev=None, vox=None, pool=None) -> RowMerge:
        """A merge of any row block of the tensors."""
        weights = self.weights(p)
        return lambda d, v, out: linear([d, v], weights, out)


class Slerp(plain_slerp.Slerp):
    """`methods.slerp.Slerp` in kernel-pool tasks and fused kernels, with `rows` for row streaming."""

    rows_need_whole = True  # the coefficients come from the whole tensors

    def prepare(self) -> None:
        bf16_kernels.prepare()

    def merge(self, dev, vox, base, p, ctx, out=None):
        return slerp(p.alpha, dev, vox, out)

    def rows(self, p, dev=None, vox=None, pool=None) -> RowMerge:
        """A merge of any row block of `dev` and `vox`, with coefficients computed here in `pool`."""
        if dev.numel() == 0:
            return lambda d, v, out: out.copy_(d)
        ca, cb = slerp_coefficients(p.alpha, dev, vox, pool)
        return lambda d, v, out: slerp_rows(d, v, ca, cb, out)
