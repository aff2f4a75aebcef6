"""Published parents as they ship: per-tensor FP8 scales and the vision parts Devstral Audio leaves out.

Devstral Small 2 stores its text linears as F8_E4M3 with a 0-dim `weight_scale_inv` (a multiplier:
w = fp8 x weight_scale_inv) and a 0-dim `activation_scale` (`qscale_weight` / `qscale_act` natively).
Only that scheme is read; anything else (block-wise scales, other methods) is refused naming the field.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_ext.checkpoint.atomic import CheckpointError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
WEIGHT_SCALE, ACT_SCALE = "weight_scale_inv", "activation_scale"
# Native scale names -> their HF spelling.
NATIVE_SCALES = {"qscale_weight": WEIGHT_SCALE, "qscale_act": ACT_SCALE}
# Tensors of the Pixtral vision tower and its projector, as HF (legacy and in-memory) and Mistral-native name them.
HF_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
NATIVE_VISION_PREFIXES = ("vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.")

log = logging.getLogger(__name__)


def split_scale(name: str) -> tuple[str, str | None]:
    """`x.weight_scale_inv` -> (`x.weight`, "weight_scale_inv"), native `qscale_*` likewise; else (name, None)."""
    stem, _, suffix = name.rpartition(".")
    kind = NATIVE_SCALES.get(suffix, suffix if suffix in (WEIGHT_SCALE, ACT_SCALE) else None)
    return (f"{stem}.weight", kind) if kind else (name, None)


def check_hf_quantization(path: Path, hf: Mapping[str, Any]) -> bool:
    """True when config.json declares per-tensor FP8 (`quantization_config`); other schemes raise naming the field."""
    qc = hf.get("quantization_config") or (hf.get("text_config") or {}).get("quantization_config")
    if qc is None:
        return False
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path}: quantization_config is not an object")
    if qc.get("quant_method") != "fp8":
        raise CheckpointError(
            f"{path}: quantization_config.quant_method={qc.get('quant_method')!r}: only 'fp8' is read"
        )
    if qc.get("weight_block_size") is not None:
        raise CheckpointError(
            f"{path}: quantization_config.weight_block_size={qc['weight_block_size']!r}: block-wise FP8 is not read "
            "(only per-tensor scales, weight_block_size null)"
        )
    if qc.get("activation_scheme", "dynamic") not in ("static", "dynamic"):
        raise CheckpointError(f"{path}: quantization_config.activation_scheme={qc['activation_scheme']!r} is unknown")
    return True


def check_native_quantization(path: Path, params: Mapping[str, Any]) -> bool:
    """True when params.json declares FP8 (`quantization`); only fp8_e4m3 weights with per-tensor scales are read."""
    q = params.get("quantization")
    if q is None:
        return False
    if not isinstance(q, dict) or q.get("qformat_weight") != "fp8_e4m3":
        got = q.get("qformat_weight") if isinstance(q, dict) else q
        raise CheckpointError(f"{path}: quantization.qformat_weight={got!r}: only 'fp8_e4m3' is read")
    if q.get("qscheme_act", "TENSOR") not in ("TENSOR", "NO_SCALES", None):
        raise CheckpointError(f"{path}: quantization.qscheme_act={q['qscheme_act']!r}: only 'TENSOR' is read")
    return True


class Fp8Scales:
    """Which weights are FP8 and their scalar scales; checked once, dequantised per tensor on read."""

    def __init__(
        self,
        directory: Path,
        scales: Mapping[str, tuple[str, str]],
        weights: Mapping[str, str],
        shape: Callable[[str], tuple[int, ...]],
        dtype: Callable[[str], torch.dtype],
        read: Callable[[str], torch.Tensor],
    ) -> None:
        """`scales`: stored scale name -> (weight name, kind); `weights`: weight name -> stored name."""
        self.directory, self._read = directory, read
        self.weight_scale: dict[str, str] = {}  # weight name -> stored weight_scale_inv
        act: dict[str, str] = {}
        for stored, (weight, kind) in sorted(scales.items()):
            if weight not in weights:
                raise CheckpointError(f"{directory}: scale {stored} has no weight {weight}")
            if shape(stored) != ():
                raise CheckpointError(
                    f"{directory}: scale {stored} has shape {list(shape(stored))}; only per-tensor FP8 "
                    "(a 0-dim scale) is read"
                )
            (self.weight_scale if kind == WEIGHT_SCALE else act)[weight] = stored
        for weight, stored in weights.items():
            is_fp8 = dtype(stored) in FP8_DTYPES
            if is_fp8 and weight not in self.weight_scale:
                raise CheckpointError(f"{directory}: FP8 tensor {stored} has no weight_scale_inv")
            if not is_fp8 and weight in self.weight_scale:
                raise CheckpointError(
                    f"{directory}: {stored} has a weight_scale_inv but dtype {dtype(stored)}, not FP8"
                )
        self.activation_scales = {w: float(read(s).to(torch.float32)) for w, s in sorted(act.items())}

    def __contains__(self, weight: str) -> bool:
        return weight in self.weight_scale

    def dequantise(self, weight: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """w = fp8 x weight_scale_inv, computed in fp32 and cast to `dtype`."""
        scale = self._read(self.weight_scale[weight]).to(torch.float32)
        return (t.to(torch.float32) * scale).to(dtype)


def published_record(dropped: list[str], activation_scales: Mapping[str, float]) -> dict[str, Any]:
    """What a published parent held beyond the model, for metadata: parts dropped (vision tower, projector)
    and the FP8 static activation scales (not applied to the dequantised weights); empty for anything else."""
    record: dict[str, Any] = {}
    if dropped:
        record["parts_dropped"] = list(dropped)
    if activation_scales:
        record["fp8"] = {"scheme": "per-tensor", "activation_scales": dict(activation_scales)}
    return record


def drop_vision(directory: Path, names: list[str], prefixes: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(kept names, dropped part prefixes): the vision tower and projector, with one log line naming them."""
    dropped = sorted({p.rstrip(".") for n in names for p in prefixes if n.startswith(p)})
    kept = [n for n in names if not n.startswith(prefixes)]
    if not kept:
        raise CheckpointError(f"{directory}: holds only vision tensors ({', '.join(dropped)}): no language model")
    if dropped:
        count = len(names) - len(kept)
        log.warning("%s: dropped %s (%d tensors): not part of Devstral Audio", directory, ", ".join(dropped), count)
    return kept, dropped
