"""What every merge method shares: the tensor context, the `Method` interface and the compute conventions.

Numerics follow mergekit 0.1.5 (the public reference, FACTS.md section 10) so outputs can be compared bit
for bit: float32 compute (float64 inputs stay float64), result cast to the input dtype. Elementwise steps
run over fixed 1 Mi-element chunks, which bounds scratch memory and gives the bits of the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from megatron_ext.merge.methods import MergeParams

CHUNK = 1024 * 1024
RowMerge = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (dev rows, vox rows, out) -> out


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32 (as mergekit)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def chunks(n: int, size: int = CHUNK) -> Iterator[slice]:
    """Consecutive slices of at most `size` covering range(n)."""
    return (slice(s, min(s + size, n)) for s in range(0, n, size))


def output(like: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`out` (checked: same shape and dtype as `like`, contiguous) or a new tensor like `like`."""
    if out is None:
        return torch.empty(like.shape, dtype=like.dtype)
    if out.shape != like.shape or out.dtype != like.dtype or not out.is_contiguous():
        raise ValueError(f"out: {out.dtype} {list(out.shape)} does not fit {like.dtype} {list(like.shape)}")
    return out


@dataclass(frozen=True)
class TensorContext:
    """What a method may know about the tensor it merges: its name, decoder layer, MLP or not."""

    name: str
    layer: int | None = None
    is_mlp: bool = False


class Method:
    """A merge method: combines Devstral's and Voxtral's version of one tensor (optionally with a base)."""

    name: ClassVar[str]
    uses_base: ClassVar[bool] = False

    def prepare(self) -> None:
        """Called once when a merge with this method starts (e.g. to load kernels meanwhile)."""

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
