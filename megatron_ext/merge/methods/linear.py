"""Linear merge: the weighted mean sum(w_i * x_i) / sum(w_i).

As mergekit computes it: a float32 accumulator starting at zero, `addcmul_` of each input in order,
divided by the weights' total, cast to the first input's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_ext.merge.methods.base import Method, chunks, compute_dtype, output

if TYPE_CHECKING:
    from megatron_ext.merge.methods import MergeParams


def linear(tensors: list[torch.Tensor], weights: list[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """sum(w_i x_i) / sum(w_i), in chunks (elementwise: the bits of the whole tensor)."""
    w = torch.tensor(weights, dtype=compute_dtype(tensors[0]))
    result = output(tensors[0], out)
    flat, dst = [t.reshape(-1) for t in tensors], result.view(-1)
    for s in chunks(dst.numel()):
        acc = torch.zeros(s.stop - s.start, dtype=w.dtype)
        for x, c in zip(flat, w.unbind(0), strict=True):
            acc.addcmul_(x[s].to(w.dtype), c)
        dst[s].copy_(acc.div_(w.sum()))
    return result


class Linear(Method):
    """Devstral weighted 1 - alpha, Voxtral alpha."""

    name = "linear"

    @staticmethod
    def weights(p: MergeParams) -> list[float]:
        """[Devstral's, Voxtral's] weight."""
        return [1.0 - p.alpha, p.alpha]

    def merge(self, dev, vox, base, p, ctx, out=None):
        return linear([dev, vox], self.weights(p), out)
