"""Detect an input checkpoint's format and present its tensors lazily under HF or Megatron names.

Formats: HF safetensors (single or sharded; Voxtral, Mistral, Ministral3 layouts; FP8 weights with
`weight_scale_inv` are dequantised on read), Mistral-native (`consolidated*.safetensors` + `params.json`;
q/k rows permuted from interleaved rope to rotate-half on read) and Megatron torch_dist (with our
`checkpoint_meta.json`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_ext.audio.positions import sinusoids
from megatron_ext.checkpoint import mapping
from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.metadata import META_FILE, TOKENIZER_FILE, CheckpointMeta, read_meta
from megatron_ext.checkpoint.mistral_native import config_from_params, convert_name, interleaved_to_half, rope_heads
from megatron_ext.checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsSource
from megatron_ext.checkpoint.shapes import decoder_shapes, encoder_shapes, to_hf_names
from megatron_ext.checkpoint.torch_dist_io import TorchDistReader, is_torch_dist
from megatron_ext.config import ConfigError, ModelConfig, RopeConfig

Kind = Literal["hf", "native", "torch_dist"]
SCALE_SUFFIX = "_scale_inv"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class InputCheckpoint:
    """A detected input: its format, model config and a lazy tensor getter under `names` (HF or Megatron)."""

    kind: Kind
    directory: Path
    cfg: ModelConfig
    description: str
    get: Callable[[str], torch.Tensor]
    names: list[str]
    files: list[Path]
    tokenizer: Path | None
    meta: CheckpointMeta | None = None
    close: Callable[[], None] = field(default=lambda: None)

    @property
    def naming(self) -> str:
        return "megatron" if self.kind == "torch_dist" else "hf"


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape implied by `cfg` in its own HF layout."""
    shapes = to_hf_names(decoder_shapes(cfg.decoder), cfg.hf_architecture)  # type: ignore[arg-type]
    if cfg.encoder is not None:
        shapes |= encoder_shapes(cfg)
        if cfg.hf_architecture == "voxtral":
            shapes[mapping.HF_POSITIONS] = (cfg.encoder.max_source_positions, cfg.encoder.hidden_size)
    return shapes


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from None


def _native_arch(params: dict[str, Any]) -> str:
    if params.get("multimodal"):
        return "voxtral"
    return "ministral3" if params.get("yarn") or params.get("llama_4_scaling") else "mistral"


def _config_diff(a: ModelConfig, b: ModelConfig) -> str | None:
    """First architecture field where two configs disagree (the HF layout name is not compared)."""
    da, db = a.to_dict(), b.to_dict()
    for section in ("decoder", "encoder", "audio_token_id"):
        x, y = da.get(section), db.get(section)
        if isinstance(x, dict) and isinstance(y, dict):
            for k in x:
                if x[k] != y.get(k):
                    return f"{section}.{k}: {x[k]} vs {y.get(k)}"
        elif x != y:
            return f"{section}: {x} vs {y}"
    return None


def rope_from_file(path: Path) -> RopeConfig:
    """Rope settings from an HF `config.json` or a Mistral-native `params.json` (for --rope-from)."""
    data = _read_json(path)
    try:
        if "n_layers" in data:
            return config_from_params(data, _native_arch(data)).decoder.rope
        return ModelConfig.from_hf(data).decoder.rope
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot read rope settings ({exc})") from None


def _check_names(directory: Path, have: set[str], expected: set[str], what: str) -> None:
    missing, unknown = sorted(expected - have), sorted(have - expected)
    if missing:
        raise CheckpointError(f"{directory}: missing {what} tensors: {', '.join(missing)}")
    if unknown:
        raise CheckpointError(f"{directory}: unknown {what} tensors: {', '.join(unknown)}")


def _hf_input(directory: Path, native_cfg: ModelConfig | None) -> InputCheckpoint:
    hf = _read_json(directory / "config.json")
    try:
        cfg = ModelConfig.from_hf(hf)
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"{directory / 'config.json'}: {exc}") from None
    if native_cfg is not None and (diff := _config_diff(cfg, native_cfg)):
        raise CheckpointError(f"{directory}: config.json and params.json disagree on {diff}")
    src = SafetensorsSource(directory)
    dtype_name = hf.get("dtype") or hf.get("torch_dtype") or (hf.get("text_config") or {}).get("dtype")
    target = TORCH_DTYPES.get(dtype_name or "", torch.bfloat16)
    scales = {n for n in src.names() if n.endswith(SCALE_SUFFIX)}
    fp8 = {n.removesuffix(SCALE_SUFFIX) for n in scales}
    shapes = expected_hf_shapes(cfg)
    _check_names(directory, set(src.names()) - scales, set(shapes), "HF")
    orphans = sorted(fp8 - set(shapes))
    if orphans:
        raise CheckpointError(f"{directory}: scales without a weight: {', '.join(o + SCALE_SUFFIX for o in orphans)}")
    for name, shape in shapes.items():
        if src.shape(name) != shape:
            raise CheckpointError(
                f"{directory}: tensor {name} has shape {list(src.shape(name))}, config says {list(shape)}"
            )
        dt = src.dtype(name)
        if name in fp8:
            if dt not in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise CheckpointError(f"{directory}: {name} has a weight_scale_inv but dtype {dt}, not FP8")
        elif dtype_name and dt != target:
            raise CheckpointError(f"{directory}: tensor {name} is {dt}, config.json says {dtype_name}")
        elif not dtype_name and dt in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointError(f"{directory}: FP8 tensor {name} has no weight_scale_inv")

    def get(name: str) -> torch.Tensor:
        t = src.get(name)
        if name in fp8:  # per-tensor (or per-block, broadcastable) FP8 dequantisation
            scale = src.get(name + SCALE_SUFFIX).to(torch.float32)
            t = (t.to(torch.float32) * scale).to(target)
        return t

    layout = "sharded" if (directory / INDEX_FILE).is_file() else "single file"
    desc = (
        f"HF {hf.get('architectures', ['?'])[0]} ({cfg.hf_architecture} layout, {layout}, "
        f"{len(src.files)} file(s){', FP8 dequantised to ' + str(target).removeprefix('torch.') if fp8 else ''})"
    )
    tok = directory / TOKENIZER_FILE
    return InputCheckpoint(
        "hf",
        directory,
        cfg,
        desc,
        get,
        list(shapes),
        src.files + [directory / "config.json"],
        tok if tok.is_file() else None,
    )


def _native_input(directory: Path) -> InputCheckpoint:
    params_path = directory / "params.json"
    params = _read_json(params_path)
    try:
        cfg = config_from_params(params, _native_arch(params))
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"{params_path}: {exc}") from None
    if (directory / "config.json").is_file():
        try:
            hf_cfg = ModelConfig.from_hf(_read_json(directory / "config.json"))
        except (ConfigError, KeyError) as exc:
            raise CheckpointError(f"{directory / 'config.json'}: {exc}") from None
        if diff := _config_diff(hf_cfg, cfg):
            raise CheckpointError(f"{directory}: config.json and params.json disagree on {diff}")
    files = sorted(p.name for p in directory.glob("consolidated*.safetensors"))
    src = SafetensorsSource(directory, files)
    to_hf: dict[str, str] = {}
    unknown = []
    for n in src.names():
        try:
            to_hf[convert_name(n, cfg.hf_architecture, to_hf=True)] = n
        except KeyError:
            unknown.append(n)
    if unknown:
        raise CheckpointError(f"{directory}: unknown Mistral-native tensors: {', '.join(sorted(unknown))}")
    shapes = expected_hf_shapes(cfg)
    stored = {n: s for n, s in shapes.items() if n != mapping.HF_POSITIONS}  # positions: recomputed
    _check_names(directory, set(to_hf), set(stored), "Mistral-native (as HF)")
    for name, shape in stored.items():
        if src.shape(to_hf[name]) != shape:
            raise CheckpointError(
                f"{directory}: tensor {to_hf[name]} has shape {list(src.shape(to_hf[name]))}, "
                f"params.json says {list(shape)}"
            )

    def get(name: str) -> torch.Tensor:
        if name == mapping.HF_POSITIONS:  # not stored natively: recomputed as on the Megatron path
            e = cfg.encoder
            assert e is not None
            return sinusoids(e.max_source_positions, e.hidden_size).to(get("audio_tower.conv1.weight").dtype)
        t = src.get(to_hf[name])
        heads = rope_heads(name, cfg)
        return interleaved_to_half(t, heads).contiguous() if heads else t

    desc = f"Mistral-native ({cfg.hf_architecture} model, {len(files)} file(s) + params.json, rope rows permuted)"
    tok = directory / TOKENIZER_FILE
    return InputCheckpoint(
        "native", directory, cfg, desc, get, list(shapes), src.files + [params_path], tok if tok.is_file() else None
    )


def _torch_dist_input(directory: Path, rope_from: Path | None) -> InputCheckpoint:
    meta: CheckpointMeta | None = None
    data = _read_json(directory / META_FILE) if (directory / META_FILE).is_file() else {}
    if rope_from is not None and "rope" not in data.get("model", {}).get("decoder", {"rope": None}):
        # Metadata without rope settings: take them from the parent's config (--rope-from), then validate.
        data["model"]["decoder"]["rope"] = dataclasses.asdict(rope_from_file(rope_from))
        try:
            cfg = ModelConfig.from_dict(data["model"])
        except ConfigError as exc:
            raise CheckpointError(f"{directory / META_FILE}: {exc}") from None
    else:
        meta = read_meta(directory)
        cfg = meta.model
    reader = TorchDistReader(directory)
    _check_names(directory, set(reader.names()), set(mapping.megatron_names(cfg)), "Megatron")
    tok = directory / TOKENIZER_FILE
    desc = f"Megatron torch_dist ({cfg.hf_architecture} model{', with audio stack' if cfg.has_audio else ''})"
    files = sorted(p for p in directory.iterdir() if p.suffix == ".distcp") + [directory / ".metadata"]
    return InputCheckpoint(
        "torch_dist",
        directory,
        cfg,
        desc,
        reader.get,
        mapping.megatron_names(cfg),
        files,
        tok if tok.is_file() else None,
        meta,
        close=reader.close,
    )


def open_input(directory: Path, rope_from: Path | None = None) -> InputCheckpoint:
    """Detect the format of `directory` and open it lazily; every bad input raises a one-line CheckpointError."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: input directory does not exist")
    if is_torch_dist(d) or (d / META_FILE).is_file():
        return _torch_dist_input(d, rope_from)
    has_hf = (d / SINGLE_FILE).is_file() or (d / INDEX_FILE).is_file()
    has_native = any(d.glob("consolidated*.safetensors"))
    if has_hf and has_native:
        raise CheckpointError(f"{d}: holds both HF (model*.safetensors) and Mistral-native (consolidated*) weights")
    if has_hf:
        if not (d / "config.json").is_file():
            raise CheckpointError(f"{d}: HF weights without config.json")
        native_cfg = None
        if (d / "params.json").is_file():
            params = _read_json(d / "params.json")
            native_cfg = config_from_params(params, _native_arch(params))
        return _hf_input(d, native_cfg)
    if has_native:
        if not (d / "params.json").is_file():
            raise CheckpointError(f"{d}: consolidated.safetensors without params.json")
        return _native_input(d)
    raise CheckpointError(f"{d}: no model.safetensors, index, consolidated.safetensors or torch_dist checkpoint found")
