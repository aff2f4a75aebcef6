"""Merge inputs: a parent checkpoint opened for tensor-by-tensor reading.

A parent knows its `ModelConfig`, tokenizer file and tensor table (name -> dtype, shape) and reads one
tensor at a time; NaN/Inf in a tensor is an error naming the checkpoint and the tensor. Kinds: HF
safetensors directories (per-tensor mappings, flat memory), Megatron torch_dist checkpoints (the
conversion module's reader and metadata), and a Megatron-named view of an HF parent (qkv and gate/up
fused on read through `checkpoint/mapping.py`) so HF and torch_dist parents can be merged together
and written as torch_dist.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import xxhash

from megatron_ext.checkpoint import mapping
from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.metadata import META_FILE, TOKENIZER_FILE, CheckpointMeta, read_meta
from megatron_ext.checkpoint.torch_dist_io import TorchDistReader, is_torch_dist
from megatron_ext.config import ConfigError, ModelConfig
from megatron_ext.merge import accel
from megatron_ext.merge.safetensors_io import Entry, SafetensorsError, read_header, read_tensor


class ParentError(ValueError):
    """A parent checkpoint is missing, malformed, or holds invalid values."""


class Parent:
    """Common part: checked reads with per-tensor digests, and a content hash for provenance."""

    format: str
    naming: str  # "hf" or "megatron"
    path: Path
    config: ModelConfig
    config_bytes: bytes
    tokenizer_path: Path

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}

    @property
    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def read(self, name: str, check: bool = True) -> torch.Tensor:
        """One tensor, checked finite unless the caller checks (`check_input`); its XXH3-128 digest is
        recorded for the parent's content hash."""
        t = self._read(name).contiguous()
        self.digests[name] = xxhash.xxh3_128_hexdigest(t.reshape(-1).view(torch.uint8).numpy())
        if check:
            self.check_input(name, t)
        return t

    def check_input(self, name: str, t: torch.Tensor) -> None:
        check_finite(t, f"{self.path}: tensor {name}")

    def content_hash(self) -> str:
        """sha256 over config, tokenizer and the tensor table with each tensor's XXH3-128 digest (a
        non-cryptographic content hash running at memory speed: it identifies a parent, it does not
        authenticate one)."""
        h = hashlib.sha256(self.config_bytes + self.tokenizer_path.read_bytes())
        for name in sorted(self.names):
            digest = self.digests.get(name, "unread")
            h.update(f"{name}|{self.dtype(name)}|{list(self.shape(name))}|{digest}\n".encode())
        return h.hexdigest()

    def _require_tokenizer(self) -> None:
        if not self.tokenizer_path.is_file():
            raise ParentError(f"{self.path}: no {TOKENIZER_FILE}")


class HFParent(Parent):
    """An HF checkpoint directory: config.json, tekken.json, model*.safetensors (index optional)."""

    format = naming = "hf"

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        self.config_bytes = cfg_path.read_bytes()
        try:
            self.hf_config = json.loads(self.config_bytes)
            self.config = ModelConfig.from_hf(self.hf_config)
        except (ValueError, KeyError, ConfigError) as exc:
            raise ParentError(f"{cfg_path}: {exc}") from None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ParentError(f"{self.path}: no *.safetensors files")
        self.entries: dict[str, Entry] = {}
        for f in files:
            try:
                entries, _ = read_header(f)
            except SafetensorsError as exc:
                raise ParentError(str(exc)) from None
            self.entries.update(entries)
        fp8 = [n for n, e in self.entries.items() if e.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
        if fp8:
            raise ParentError(
                f"{self.path}: FP8 tensors (e.g. {fp8[0]}): dequantise first (tools/convert.py), merges need bf16/fp32"
            )
        self.tokenizer_path = self.path / TOKENIZER_FILE
        self._require_tokenizer()

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def _read(self, name: str) -> torch.Tensor:
        return self.read_rows(name)

    def read_rows(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or its rows [start, stop), mapped from its file (unchecked, no digest recorded)."""
        if name not in self.entries:
            raise ParentError(f"{self.path}: missing tensor {name}")
        try:
            return read_tensor(self.entries[name], rows)
        except CheckpointError as exc:
            raise ParentError(str(exc)) from None


class TorchDistParent(Parent):
    """A Megatron torch_dist checkpoint with `checkpoint_meta.json` (rope settings required) and tekken.json."""

    format, naming = "torch_dist", "megatron"

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        try:
            self.meta: CheckpointMeta = read_meta(self.path)
            self.reader = TorchDistReader(self.path)
        except CheckpointError as exc:
            raise ParentError(str(exc)) from None
        self.config = self.meta.model
        self.config_bytes = (self.path / META_FILE).read_bytes()
        self.tokenizer_path = self.path / TOKENIZER_FILE
        self._require_tokenizer()
        self._names = self.reader.names()

    @property
    def names(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.reader.info(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.info(name).dtype

    def _read(self, name: str) -> torch.Tensor:
        try:
            return self.reader.get(name)
        except CheckpointError as exc:
            raise ParentError(str(exc)) from None


class MegatronView(Parent):
    """An HF parent presented under Megatron names (`checkpoint/mapping.py` rules, fused on read)."""

    naming = "megatron"

    def __init__(self, hf: HFParent):
        super().__init__()
        self.hf = hf
        self.path, self.config, self.format = hf.path, hf.config, hf.format
        self.config_bytes, self.tokenizer_path = hf.config_bytes, hf.tokenizer_path
        self.rules = {r.megatron: r for r in mapping.rules(hf.config)}
        missing = [h for r in self.rules.values() for h in r.hf if h not in hf.entries]
        if missing:
            raise ParentError(f"{hf.path}: missing tensors for the Megatron layout: {', '.join(missing[:4])}")
        self._meta = {
            n: self._fuse(r, [torch.empty(hf.shape(h), dtype=hf.dtype(h), device="meta") for h in r.hf])
            for n, r in self.rules.items()
        }

    def _fuse(self, rule: mapping.Rule, parts: list[torch.Tensor]) -> torch.Tensor:
        if rule.tower == "encoder":
            e = self.config.encoder
            geometry = (e.num_attention_heads, e.num_attention_heads, e.hidden_size // e.num_attention_heads)
        else:
            d = self.config.decoder
            geometry = (d.num_attention_heads, d.num_query_groups, d.kv_channels)
        try:
            return rule.transform.to_megatron(parts, *geometry)
        except RuntimeError as exc:
            raise ParentError(f"{self.path}: cannot build {rule.megatron} from {list(rule.hf)}: {exc}") from None

    @property
    def names(self) -> list[str]:
        return list(self.rules)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name].dtype

    def _read(self, name: str) -> torch.Tensor:
        rule = self.rules[name]
        return self._fuse(rule, [self.hf.read(h) for h in rule.hf])


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
    """Open a parent directory (HF safetensors or torch_dist) under `naming` ("hf" or "megatron")."""
    path = Path(path)
    if not path.is_dir():
        raise ParentError(f"{path}: not a directory")
    if is_torch_dist(path) or (path / META_FILE).is_file():
        parent: Parent = TorchDistParent(path)
        if naming == "hf":
            raise ParentError(f"{path}: torch_dist parents give Megatron output only (use --format megatron)")
        return parent
    if (path / "config.json").is_file():
        hf = HFParent(path)
        return MegatronView(hf) if naming == "megatron" else hf
    raise ParentError(f"{path}: neither an HF checkpoint (config.json) nor a Megatron torch_dist checkpoint")


def detect_naming(paths: list[Path], out_format: str) -> str:
    """Megatron naming when the output is torch_dist or any parent is; HF naming otherwise."""
    if out_format == "megatron" or any(is_torch_dist(p) or (Path(p) / META_FILE).is_file() for p in paths):
        return "megatron"
    return "hf"
