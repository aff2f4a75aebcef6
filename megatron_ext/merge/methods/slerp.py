"""SLERP: spherical linear interpolation between two whole tensors, each flattened to one vector.

With cos(theta) = <v0 / |v0|, v1 / |v1|>, the result is
    sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1,
so t = 0 gives v0 and t = 1 gives v1. Nearly (anti)collinear directions (|cos| > 0.9995) interpolate
linearly; a norm below 1e-8 counts as 1. As mergekit computes it: the reductions run over 1 Mi-element
chunks (the norm of the chunks' norms, the sum of the chunks' dot products), in float32.
"""

from __future__ import annotations

import torch

from megatron_ext.merge.methods.base import Method, chunks, compute_dtype, output

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The interpolation of v0 and v1 at t (see the module docstring)."""
    result = output(v0, out)
    if v0.numel() == 0:
        return result
    ca, cb = slerp_coefficients(t, v0, v1)
    return slerp_rows(v0, v1, ca, cb, result)


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float]:
    """(ca, cb) with slerp = ca * v0 + cb * v1, from the whole (non-empty) tensors."""
    dt = compute_dtype(v0)
    a, b = v0.reshape(-1), v1.reshape(-1)
    parts = list(chunks(a.numel()))
    na = norm_of_parts(torch.stack([torch.linalg.vector_norm(a[s].to(dt)) for s in parts]))
    nb = norm_of_parts(torch.stack([torch.linalg.vector_norm(b[s].to(dt)) for s in parts]))
    dot = torch.stack([((a[s].to(dt) / na) * (b[s].to(dt) / nb)).sum() for s in parts]).sum()
    return coefficients(t, dot)


def norm_of_parts(parts: torch.Tensor) -> float:
    """The norm of the chunks' norms, or 1.0 below the degeneracy threshold."""
    value = torch.linalg.vector_norm(parts)
    return value.item() if value > NORM_EPS else 1.0


def coefficients(t: float, dot: torch.Tensor) -> tuple[float, float]:
    """(ca, cb) from the cosine `dot` of the normalized vectors (a 0-d tensor in the compute dtype)."""
    cos = dot.clamp(-1, 1)
    tt = torch.tensor(t, dtype=dot.dtype)
    if cos.abs() > DOT_THRESHOLD:
        return (1 - tt).item(), tt.item()
    theta = torch.acos(cos)
    sin_theta = torch.sin(theta)
    return (torch.sin((1 - tt) * theta) / sin_theta).item(), (torch.sin(tt * theta) / sin_theta).item()


def slerp_rows(
    v0: torch.Tensor, v1: torch.Tensor, ca: float, cb: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """ca * v0 + cb * v1 in the compute dtype, cast to v0's dtype: elementwise, so any part of the tensors
    (a row block) gives the bits of the whole."""
    dt = compute_dtype(v0)
    a, b = v0.reshape(-1), v1.reshape(-1)
    result = output(v0, out)
    dst = result.view(-1)
    for s in chunks(a.numel()):
        dst[s].copy_(a[s].to(dt) * ca + b[s].to(dt) * cb)
    return result


class Slerp(Method):
    """t = alpha, from Devstral (alpha 0) to Voxtral (alpha 1)."""

    name = "slerp"

    def merge(self, dev, vox, base, p, ctx, out=None):
        return slerp(p.alpha, dev, vox, out)
