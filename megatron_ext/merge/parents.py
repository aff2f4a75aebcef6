"""Merge inputs: a checkpoint opened through the shared reader (`checkpoint/source.py`), read tensor by tensor.

A parent adds to its `Source` what a merge needs: NaN/Inf in a tensor is an error naming the checkpoint
and the tensor, each tensor read gets an XXH3-128 digest for the parent's content hash, and a parent
whose tensors are stored as read (HF safetensors without FP8) is an `HFParent`, whose row ranges map
straight from the file (`row_stream.py`). Any format the reader opens can be a parent (HF, FP8 HF,
Mistral-native, torch_dist); under Megatron naming an HF-named parent is viewed through `Source.megatron()`
(qkv and gate/up fused on read) so HF and torch_dist parents can be merged together and written as torch_dist.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.metadata import META_FILE, TOKENIZER_FILE
from megatron_ext.checkpoint.source import Source, open_checkpoint, tensor_digest
from megatron_ext.checkpoint.torch_dist_io import is_torch_dist
from megatron_ext.config import ModelConfig
from megatron_ext.errors import ProjectError
from megatron_ext.merge import accel


class ParentError(ProjectError, ValueError):
    """A parent checkpoint is missing, malformed, or holds invalid values."""


class Parent:
    """A merge input: checked reads with per-tensor digests, and a content hash for provenance."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.path: Path = source.directory
        self.config: ModelConfig = source.cfg
        self.format: str = source.kind
        self.naming: str = source.naming
        if source.tokenizer is None:
            raise ParentError(f"{self.path}: no {TOKENIZER_FILE}")
        self.tokenizer_path: Path = source.tokenizer
        self.digests: dict[str, str] = {}

    @property
    def names(self) -> list[str]:
        return self.source.names

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(name)

    def read(self, name: str, check: bool = True) -> torch.Tensor:
        """One tensor, checked finite unless the caller checks (`check_input`); its XXH3-128 digest is
        recorded for the parent's content hash."""
        try:
            t = self.source.get(name).contiguous()
        except CheckpointError as exc:
            raise ParentError(str(exc)) from None
        except KeyError:
            raise ParentError(f"{self.path}: missing tensor {name}") from None
        self.digests[name] = tensor_digest(t)
        if check:
            self.check_input(name, t)
        return t

    def check_input(self, name: str, t: torch.Tensor) -> None:
        check_finite(t, f"{self.path}: tensor {name}")

    def content_hash(self) -> str:
        """sha256 over config, tokenizer and the tensor table with each tensor's XXH3-128 digest (a
        non-cryptographic content hash running at memory speed: it identifies a parent, it does not
        authenticate one)."""
        return self.source.content_digest(self.digests)


class HFParent(Parent):
    """A parent whose every tensor is stored as read (HF safetensors, no FP8): rows map from the file."""

    def read_rows(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or its rows [start, stop), mapped from its file (unchecked, no digest recorded)."""
        try:
            return self.source.read_rows(name, rows)
        except CheckpointError as exc:
            raise ParentError(str(exc)) from None


def is_finite(t: torch.Tensor) -> bool:
    """False when a floating tensor holds NaN or Inf: contiguous bf16 through its exponent bits
    (`accel.all_finite`, when on), else min and max, which propagate NaN and expose +-Inf (`aminmax` reads
    the tensor once without temporaries, several times faster than a float32 sum)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    fast = accel.all_finite(t)
    if fast is not None:
        return fast
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise naming `what` when a floating tensor holds NaN or Inf."""
    if not is_finite(t):
        raise ParentError(f"{what} contains NaN or Inf")


def open_parent(path: Path, naming: str = "hf") -> Parent:
    """Open a parent directory (any format `open_checkpoint` reads) under `naming` ("hf" or "megatron")."""
    try:
        source = open_checkpoint(Path(path), check_layout=False)  # the merge's plan checks names and shapes
        if source.naming == "megatron" and naming == "hf":
            raise ParentError(f"{path}: torch_dist parents give Megatron output only (use --format megatron)")
        if naming == "megatron":
            return Parent(source.megatron())
    except CheckpointError as exc:
        raise ParentError(str(exc)) from None
    stored_as_read = all(source.reads_rows(n) for n in source.names)
    return HFParent(source) if stored_as_read else Parent(source)


def detect_naming(paths: list[Path], out_format: str) -> str:
    """Megatron naming when the output is torch_dist or any parent is; HF naming otherwise."""
    if out_format == "megatron" or any(is_torch_dist(p) or (Path(p) / META_FILE).is_file() for p in paths):
        return "megatron"
    return "hf"
