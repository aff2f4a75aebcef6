"""Merge methods as plain torch math, one module each (`linear.py`, `slerp.py`, `della.py`), and the registry.

Each method is a small `Method` class around pure tensor functions that give mergekit's bits;
`METHODS` maps a method's name to it. `MergeParams` holds every method parameter, checked once before any
tensor is read. Faster twins with the same bits live in `megatron_ext.merge.accel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_ext.merge.methods.base import Method, RowMerge, TensorContext
from megatron_ext.merge.methods.della import Della, RescaleNorm, check_della_window
from megatron_ext.merge.methods.linear import Linear
from megatron_ext.merge.methods.slerp import Slerp

METHODS: dict[str, Method] = {m.name: m for m in (Linear(), Slerp(), Della())}

__all__ = ["METHODS", "MergeParams", "Method", "RowMerge", "TensorContext"]


def _check_number(value: object, name: str) -> None:
    """A finite int or float, else ValueError naming the parameter (NaN passes every range check)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be a finite number")


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
        """Raise ValueError naming the first parameter out of range for this method."""
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {', '.join(METHODS)}")
        for field in ("alpha", "density", "epsilon", "lam", "mlp_density_boost", "early_lambda_scale"):
            _check_number(getattr(self, field), "lambda" if field == "lam" else field)
        for field in ("seed", "early_layers"):
            if isinstance(getattr(self, field), bool) or not isinstance(getattr(self, field), int):
                raise ValueError(f"{field}={getattr(self, field)!r}: must be an integer")
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
        """The parameters this method uses (provenance, resume identity)."""
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
