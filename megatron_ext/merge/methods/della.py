"""DELLA (drop, elect, fuse): merge the parents' deltas against an anchor, pruned by magnitude.

1. MagPrune: each delta element is kept with a probability that grows with its magnitude rank in its row
   (linearly from density - epsilon to density + epsilon), then the survivors are rescaled (`magprune`).
2. Elect: with two deltas (against a common base), each element's sign is the sign of the summed
   weighted deltas; deltas of the other sign are dropped (`elect_and_fuse`).
3. Fuse: the weighted mean of the agreeing deltas, scaled by lambda, is added to the anchor.
Schedule: MLP tensors keep more (density + mlp_density_boost); the first `early_layers` decoder blocks
merge more conservatively (lambda * early_lambda_scale). Draws come from a generator seeded by (seed,
tensor name), so a result does not depend on the order tensors are processed in (resumable, parallel-safe).
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch

from megatron_ext.merge.methods.base import CHUNK, Method, chunks, output

RescaleNorm = Literal["l1", "l2", "linf", "per_weight"]


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
    """Raise unless every keep probability, [density - epsilon, density + epsilon], lies in (0, 1]."""
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
    for sl in chunks(rows.shape[0], max(1, CHUNK // max(1, rows.shape[1]))):
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
        return output(dev, out).copy_(a32 + lam * fused)
