"""One reader for every checkpoint format: `open_checkpoint(path) -> Source`, used by convert, merge, model
loading, logits and evaluation.

Formats: HF safetensors (single or sharded; Voxtral, Mistral, Ministral3 layouts, and Mistral3 read as its
text model), Mistral-native (`consolidated.safetensors` or a split set + `params.json`; q/k rows permuted
from interleaved rope to rotate-half on read); per-tensor FP8 is dequantised on read and a vision tower
dropped (`published.py`); and Megatron torch_dist (with our `checkpoint_meta.json`, flat or in Megatron-LM's
`release/`/`iter_N/` + tracker layout, or Megatron-LM's own GPTModel checkpoints completed by --rope-from and
a tokenizer). A `Source` names its tensors the HF way (HF, Mistral-native) or the Megatron way
(torch_dist); `Source.megatron()` presents an HF-named source under Megatron names (qkv and gate/up fused
on read). Every bad input is one `CheckpointError` naming the file, tensor or field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import xxhash

from megatron_ext.audio.positions import sinusoids
from megatron_ext.checkpoint import mapping, megatron_lm
from megatron_ext.checkpoint.atomic import PARTIAL_TAG, CheckpointError
from megatron_ext.checkpoint.metadata import META_FILE, TOKENIZER_FILE, CheckpointMeta, read_meta
from megatron_ext.checkpoint.mistral_native import config_from_params, convert_name, interleaved_to_half, rope_heads
from megatron_ext.checkpoint.published import (
    HF_VISION_PREFIXES,
    NATIVE_VISION_PREFIXES,
    Fp8Scales,
    check_hf_quantization,
    check_native_quantization,
    drop_vision,
    split_scale,
)
from megatron_ext.checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsSource
from megatron_ext.checkpoint.shapes import decoder_shapes, encoder_shapes, to_hf_names
from megatron_ext.checkpoint.torch_dist_io import TorchDistReader, is_torch_dist
from megatron_ext.config import ConfigError, ModelConfig, RopeConfig

Kind = Literal["hf", "native", "torch_dist"]
Naming = Literal["hf", "megatron"]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CONFIG_ERRORS = (ConfigError, KeyError, TypeError, ValueError, AttributeError)


def tensor_digest(t: torch.Tensor) -> str:
    """XXH3-128 of a tensor's bytes: a non-cryptographic digest at memory speed (identifies, not authenticates)."""
    return xxhash.xxh3_128_hexdigest(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def all_finite(t: torch.Tensor) -> bool:
    """False when a floating tensor holds NaN or Inf (min and max propagate NaN and expose +-Inf; `aminmax`
    reads the tensor once, without a mask the size of the tensor)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


class Source:
    """An opened checkpoint: model config, tokenizer file and a lazy table of tensors (names, shapes, dtypes)."""

    kind: Kind
    naming: Naming
    directory: Path
    cfg: ModelConfig
    description: str
    files: list[Path]  # the files the tensors and config come from (hashed as the sources of a conversion)
    tokenizer: Path | None
    config_bytes: bytes  # config.json, params.json or checkpoint_meta.json as stored
    meta: CheckpointMeta | None = None
    dropped: list[str] = []  # parts of the published checkpoint not read (vision tower, projector)
    activation_scales: dict[str, float] = {}  # FP8 weight -> its static activation scale (recorded, not applied)

    @property
    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """The full tensor `name` as the model sees it (dequantised, rope rows permuted)."""
        raise NotImplementedError

    def reads_rows(self, name: str) -> bool:
        """True when `read_rows` can map a row range of `name` straight from its file."""
        return False

    def read_rows(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor stored as is (`reads_rows`), mapped from its file."""
        raise CheckpointError(f"{self.directory}: tensor {name} is not stored as read; it cannot be read by rows")

    def content_digest(self, digests: Mapping[str, str]) -> str:
        """sha256 over config, tokenizer and the tensor table with each tensor's digest (`tensor_digest`)."""
        h = hashlib.sha256(self.config_bytes + (self.tokenizer.read_bytes() if self.tokenizer else b""))
        for name in sorted(self.names):
            h.update(f"{name}|{self.dtype(name)}|{list(self.shape(name))}|{digests.get(name, 'unread')}\n".encode())
        return h.hexdigest()

    def megatron(self) -> Source:
        """This checkpoint under Megatron names (itself when already Megatron-named)."""
        return self if self.naming == "megatron" else MegatronView(self)

    def close(self) -> None:
        """Release open files (torch_dist)."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_names(directory: Path, have: set[str], expected: set[str], what: str) -> None:
    missing, unknown = sorted(expected - have), sorted(have - expected)
    if missing:
        raise CheckpointError(f"{directory}: missing {what} tensors: {', '.join(missing)}")
    if unknown:
        raise CheckpointError(f"{directory}: unknown {what} tensors: {', '.join(unknown)}")


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape implied by `cfg` in its own HF layout."""
    shapes = to_hf_names(decoder_shapes(cfg.decoder), cfg.hf_architecture)  # type: ignore[arg-type]
    if cfg.encoder is not None:
        shapes |= encoder_shapes(cfg)
        if cfg.hf_architecture == "voxtral":
            shapes[mapping.HF_POSITIONS] = (cfg.encoder.max_source_positions, cfg.encoder.hidden_size)
    return shapes


def _read_json(path: Path) -> tuple[dict[str, Any], bytes]:
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data, raw


def _native_arch(params: dict[str, Any]) -> str:
    if params.get("multimodal"):
        return "voxtral"
    return "ministral3" if params.get("yarn") or params.get("llama_4_scaling") else "mistral"


def _native_config(path: Path) -> tuple[ModelConfig, bytes]:
    params, raw = _read_json(path)
    try:
        return config_from_params(params, _native_arch(params)), raw
    except _CONFIG_ERRORS as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _hf_config(path: Path) -> tuple[ModelConfig, dict[str, Any], bytes]:
    hf, raw = _read_json(path)
    try:
        return ModelConfig.from_hf(hf), hf, raw
    except _CONFIG_ERRORS as exc:
        raise CheckpointError(f"{path}: {exc}") from None


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
    data, _ = _read_json(path)
    if "n_layers" in data:
        return _native_config(path)[0].decoder.rope
    return _hf_config(path)[0].decoder.rope


def _tokenizer(directory: Path) -> Path | None:
    tok = directory / TOKENIZER_FILE
    return tok if tok.is_file() else None


def _hf_text_name(name: str) -> str:
    """A Mistral3 text tensor under its CausalLM name (legacy `language_model.model.*` or in-memory names)."""
    for prefix in ("language_model.model.", "model.language_model."):
        if name.startswith(prefix):
            return "model." + name.removeprefix(prefix)
    return name.removeprefix("language_model.")  # language_model.lm_head.weight -> lm_head.weight


class _StoredTensors(Source):
    """A source whose tensors are stored under other names (`_stored`), FP8 ones dequantised on read."""

    src: SafetensorsSource
    _stored: dict[str, str]  # name as presented -> name in the files
    fp8: Fp8Scales
    target: torch.dtype

    def _scan(self, stored: list[str], rename: Callable[[str], str], what: str) -> None:
        """Split stored names into weights and FP8 scales (`rename`: stored name -> presented name)."""
        scales: dict[str, tuple[str, str]] = {}
        self._stored, unknown = {}, []
        for n in stored:
            weight, kind = split_scale(n)
            try:
                presented = rename(weight)
            except KeyError:
                unknown.append(n)
                continue
            if kind:
                scales[n] = (presented, kind)
            else:
                self._stored[presented] = n
        if unknown:
            raise CheckpointError(f"{self.directory}: unknown {what} tensors: {', '.join(sorted(unknown))}")
        self.fp8 = Fp8Scales(self.directory, scales, self._stored, self.src.shape, self.src.dtype, self.src.get)
        self.activation_scales = self.fp8.activation_scales

    def _stored_name(self, name: str) -> str:
        if name not in self._stored:
            raise CheckpointError(f"{self.directory}: tensor {name!r} not found")
        return self._stored[name]

    def _read(self, name: str) -> torch.Tensor:
        t = self.src.get(self._stored_name(name))
        return self.fp8.dequantise(name, t, self.target) if name in self.fp8 else t


class HFCheckpoint(_StoredTensors):
    """HF safetensors (single file or index + shards; Mistral3 read as its text model); FP8 dequantised on read."""

    kind = "hf"
    naming = "hf"

    def __init__(self, directory: Path, native_cfg: ModelConfig | None = None, check_layout: bool = True) -> None:
        self.directory = directory
        cfg_path = directory / "config.json"
        self.cfg, hf, self.config_bytes = _hf_config(cfg_path)
        if native_cfg is not None and (diff := _config_diff(self.cfg, native_cfg)):
            raise CheckpointError(f"{directory}: config.json and params.json disagree on {diff}")
        quantised = check_hf_quantization(cfg_path, hf)
        self.src = src = SafetensorsSource(directory)
        text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else {}
        dtype_name = hf.get("dtype") or hf.get("torch_dtype") or text.get("dtype")
        self.target = TORCH_DTYPES.get(dtype_name or "", torch.bfloat16)
        stored = src.names()
        if hf.get("model_type") == "mistral3":
            stored, self.dropped = drop_vision(directory, stored, HF_VISION_PREFIXES)
        self._scan(stored, _hf_text_name if hf.get("model_type") == "mistral3" else str, "HF")
        if self.fp8.weight_scale and not quantised:
            raise CheckpointError(f"{directory}: FP8 weights with scales but config.json has no quantization_config")
        shapes = expected_hf_shapes(self.cfg)
        if check_layout:
            _check_names(directory, set(self._stored), set(shapes), "HF")
            for name, want in shapes.items():  # in config order: the first tensor a wrong field shows in is named
                n = self._stored[name]
                if src.shape(n) != want:
                    raise CheckpointError(
                        f"{directory}: tensor {n} has shape {list(src.shape(n))}, config says {list(want)}"
                    )
                if dtype_name and name not in self.fp8 and src.dtype(n) != self.target:
                    raise CheckpointError(f"{directory}: tensor {n} is {src.dtype(n)}, config.json says {dtype_name}")
        layout = "sharded" if (directory / INDEX_FILE).is_file() else "single file"
        target = str(self.target).removeprefix("torch.")
        dequant = f", FP8 dequantised to {target}" if self.fp8.weight_scale else ""
        arch = (hf.get("architectures") or ["?"])[0]
        self.description = f"HF {arch} ({self.cfg.hf_architecture} layout, {layout}, {len(src.files)} file(s){dequant})"
        self.files = src.files + [cfg_path]
        self.tokenizer = _tokenizer(directory)

    @property
    def names(self) -> list[str]:
        return list(self._stored)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.src.shape(self._stored_name(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.target if name in self.fp8 else self.src.dtype(self._stored_name(name))

    def get(self, name: str) -> torch.Tensor:
        return self._read(name)

    def reads_rows(self, name: str) -> bool:
        return name in self._stored and name not in self.fp8

    def read_rows(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if not self.reads_rows(name):
            return super().read_rows(name, rows)
        return self.src.get(self._stored[name], rows)


_SPLIT = re.compile(r"^consolidated-(\d+)-of-(\d+)\.safetensors$")


def _consolidated_files(directory: Path) -> list[str]:
    """`consolidated.safetensors` or a complete `consolidated-0000N-of-0000M` set (a missing file is named)."""
    files = sorted(p.name for p in directory.glob("consolidated*.safetensors"))
    split = [m for f in files if (m := _SPLIT.match(f))]
    if not split:
        return files
    total = int(split[0].group(2))
    width = len(split[0].group(1))
    expected = {f"consolidated-{i:0{width}d}-of-{split[0].group(2)}.safetensors" for i in range(1, total + 1)}
    missing = sorted(expected - set(files))
    if missing:
        raise CheckpointError(f"{directory}: split consolidated set is missing {', '.join(missing)}")
    extra = sorted(set(files) - expected)
    if extra:
        raise CheckpointError(f"{directory}: {', '.join(extra)} is not part of the {total}-file consolidated set")
    return files


class NativeCheckpoint(_StoredTensors):
    """Mistral-native `consolidated*.safetensors` + `params.json`, presented under HF names and layout."""

    kind = "native"
    naming = "hf"

    def __init__(self, directory: Path, check_layout: bool = True) -> None:
        self.directory = directory
        params_path = directory / "params.json"
        self.cfg, self.config_bytes = _native_config(params_path)
        if (directory / "config.json").is_file():
            hf_cfg = _hf_config(directory / "config.json")[0]
            if diff := _config_diff(hf_cfg, self.cfg):
                raise CheckpointError(f"{directory}: config.json and params.json disagree on {diff}")
        params = json.loads(self.config_bytes)
        quantised = check_native_quantization(params_path, params)
        files = _consolidated_files(directory)
        self.src = src = SafetensorsSource(directory, files)
        stored = src.names()
        if params.get("vision_encoder"):
            stored, self.dropped = drop_vision(directory, stored, NATIVE_VISION_PREFIXES)
        self._scan(stored, lambda n: convert_name(n, self.cfg.hf_architecture, to_hf=True), "Mistral-native")
        if self.fp8.weight_scale and not quantised:
            raise CheckpointError(f"{directory}: FP8 weights with scales but params.json has no quantization block")
        unquantised = [src.dtype(n) for h, n in self._stored.items() if h not in self.fp8]
        self.target = unquantised[0] if unquantised else torch.bfloat16
        expected = expected_hf_shapes(self.cfg)
        self._shapes = {n: src.shape(native) for n, native in self._stored.items()}
        if check_layout:
            stored_shapes = {n: s for n, s in expected.items() if n != mapping.HF_POSITIONS}
            _check_names(directory, set(self._stored), set(stored_shapes), "Mistral-native (as HF)")
            for name, shape in stored_shapes.items():
                if self._shapes[name] != shape:
                    raise CheckpointError(
                        f"{directory}: tensor {self._stored[name]} has shape {list(self._shapes[name])}, "
                        f"params.json says {list(shape)}"
                    )
        if mapping.HF_POSITIONS in expected:  # not stored natively: recomputed on read
            self._shapes[mapping.HF_POSITIONS] = expected[mapping.HF_POSITIONS]
        arch = self.cfg.hf_architecture
        fp8 = ", FP8 dequantised" if self.fp8.weight_scale else ""
        self.description = f"Mistral-native ({arch} model, {len(files)} file(s) + params.json, rope rows permuted{fp8})"
        self.files = src.files + [params_path]
        self.tokenizer = _tokenizer(directory)

    @property
    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        if name == mapping.HF_POSITIONS:
            return self.dtype("audio_tower.conv1.weight")
        return self.target if name in self.fp8 else self.src.dtype(self._stored_name(name))

    def get(self, name: str) -> torch.Tensor:
        if name == mapping.HF_POSITIONS:  # not stored natively: recomputed as on the Megatron path
            e = self.cfg.encoder
            assert e is not None
            return sinusoids(e.max_source_positions, e.hidden_size).to(self.dtype(name))
        t = self._read(name)
        heads = rope_heads(name, self.cfg)
        if not heads:
            return t
        if t.dim() != 2 or t.shape[0] % (2 * heads):
            raise CheckpointError(
                f"{self.directory}: tensor {self._stored[name]} {list(t.shape)} has no {heads} rope heads"
            )
        return interleaved_to_half(t, heads).contiguous()


class TorchDistCheckpoint(Source):
    """Megatron torch_dist under our Megatron names (DCP metadata read safely): ours with `checkpoint_meta.json`,
    or Megatron-LM's (GPTModel keys, no metadata) completed by `rope_from` and `tokenizer`."""

    kind = "torch_dist"
    naming = "megatron"

    def __init__(
        self, directory: Path, rope_from: Path | None = None, check_layout: bool = True, tokenizer: Path | None = None
    ) -> None:
        self.directory = directory
        self.reader = TorchDistReader(directory)
        meta_path = directory / META_FILE
        stored = self.reader.names()
        gpt = "embedding.word_embeddings.weight" in stored  # Megatron-LM GPTModel keys, not ours
        if not meta_path.is_file():
            self.cfg, raw = _megatron_lm_config(directory, self.reader, rope_from, tokenizer)
        else:
            data, raw = _read_json(meta_path)
            model = data.get("model")
            decoder = model.get("decoder", {"rope": None}) if isinstance(model, dict) else {}
            if rope_from is not None and isinstance(decoder, dict) and "rope" not in decoder:
                # Metadata without rope settings: take them from the parent's config (--rope-from), then validate.
                decoder["rope"] = dataclasses.asdict(rope_from_file(rope_from))
                try:
                    self.cfg = ModelConfig.from_dict(data["model"])
                except _CONFIG_ERRORS as exc:
                    raise CheckpointError(f"{meta_path}: {exc}") from None
            else:
                self.meta = read_meta(directory)
                self.cfg = self.meta.model
        self.config_bytes = raw
        self._stored = _gpt_names(stored) if gpt else {n: n for n in stored}
        if check_layout:
            _check_names(directory, set(self._stored), set(mapping.megatron_names(self.cfg)), "Megatron")
        audio = ", with audio stack" if self.cfg.has_audio else ""
        keys = ", Megatron-LM GPTModel keys" if gpt else ""
        self.description = f"Megatron torch_dist ({self.cfg.hf_architecture} model{audio}{keys})"
        self.files = sorted(p for p in directory.iterdir() if p.suffix == ".distcp") + [directory / ".metadata"]
        self.tokenizer = tokenizer or _tokenizer(directory)

    @property
    def names(self) -> list[str]:
        return list(self._stored)

    def _key(self, name: str) -> str:
        if name not in self._stored:
            raise CheckpointError(f"{self.directory}: no tensor {name!r} in the torch_dist checkpoint")
        return self._stored[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.reader.info(self._key(name)).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.info(self._key(name)).dtype

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(self._key(name))

    def close(self) -> None:
        self.reader.close()


def _gpt_names(stored: list[str]) -> dict[str, str]:
    """Our name -> stored GPTModel key (`language_model.` added; separate-norm specs' norm keys aliased)."""
    out = {}
    for key in stored:
        name = megatron_lm.GPT_PREFIX + key
        for ours, theirs in megatron_lm.GPT_NORM_ALIASES.items():
            if name.endswith("." + theirs) and ".layers." in name:
                name = name.removesuffix(theirs) + ours
        out[name] = key
    return out


def _megatron_lm_config(
    directory: Path, reader: TorchDistReader, rope_from: Path | None, tokenizer: Path | None
) -> tuple[ModelConfig, bytes]:
    """A decoder config for a Megatron-LM checkpoint without our metadata: vocabulary, width, depth and FFN from
    the tensors' shapes, heads / groups / head size / norm epsilon from the common state's args when present,
    otherwise from the `rope_from` config, which also gives the rope settings."""
    if rope_from is None or (tokenizer is None and _tokenizer(directory) is None):
        raise CheckpointError(
            f"{directory}: torch_dist without {META_FILE} (a Megatron-LM checkpoint): give --rope-from "
            "PARENT/config.json|params.json (rope and attention geometry) and --tokenizer tekken.json"
        )
    data, _ = _read_json(rope_from)
    base = _native_config(rope_from)[0] if "n_layers" in data else _hf_config(rope_from)[0]
    names = set(reader.names())
    layer = "decoder.layers.0."
    needed = [
        "embedding.word_embeddings.weight",
        layer + "mlp.linear_fc2.weight",
        layer + "self_attention.linear_qkv.weight",
    ]
    if missing := [n for n in needed if n not in names]:
        raise CheckpointError(f"{directory}: not a GPTModel checkpoint (no tensor {missing[0]})")
    vocab, hidden = reader.info(needed[0]).shape
    ffn = reader.info(needed[1]).shape[1]
    num_layers = 1 + max(int(n.split(".")[2]) for n in names if n.startswith("decoder.layers."))
    common = reader.directory / "common.pt"
    args = megatron_lm.load_common(common).get("args") if common.is_file() else None
    d = base.decoder
    heads, groups, kv, eps = d.num_attention_heads, d.num_query_groups, d.kv_channels, d.norm_eps
    if getattr(args, "num_attention_heads", None):  # Megatron-LM's defaults where an arg is unset
        heads = args.num_attention_heads
        gqa = getattr(args, "group_query_attention", False) and getattr(args, "num_query_groups", None)
        groups = args.num_query_groups if gqa else heads
        kv = getattr(args, "kv_channels", None) or hidden // heads
        eps = getattr(args, "norm_epsilon", None) or getattr(args, "layernorm_epsilon", None) or eps
    qkv = reader.info(needed[2]).shape
    if qkv != ((heads + 2 * groups) * kv, hidden):
        raise CheckpointError(
            f"{directory}: tensor {needed[2]} has shape {list(qkv)}, but {heads} heads, {groups} query groups of "
            f"size {kv} and hidden size {hidden} need {[(heads + 2 * groups) * kv, hidden]}"
        )
    arch = "mistral" if base.hf_architecture == "voxtral" else base.hf_architecture
    try:
        decoder = dataclasses.replace(
            d,
            num_layers=num_layers,
            hidden_size=hidden,
            ffn_hidden_size=ffn,
            num_attention_heads=heads,
            num_query_groups=groups,
            kv_channels=kv,
            vocab_size=vocab,
            norm_eps=eps,
        )
        cfg = ModelConfig(decoder=decoder, hf_architecture=arch)
    except _CONFIG_ERRORS as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
    return cfg, json.dumps(cfg.to_dict(), sort_keys=True).encode()


class MegatronView(Source):
    """An HF-named source under Megatron names (`checkpoint/mapping.py` rules; qkv and gate/up fused on read)."""

    naming = "megatron"

    def __init__(self, hf: Source) -> None:
        self.hf = hf
        self.kind, self.directory, self.cfg, self.description = hf.kind, hf.directory, hf.cfg, hf.description
        self.files, self.tokenizer, self.config_bytes = hf.files, hf.tokenizer, hf.config_bytes
        self.dropped, self.activation_scales = hf.dropped, hf.activation_scales
        self.rules = {r.megatron: r for r in mapping.rules(hf.cfg)}
        have = set(hf.names)
        missing = [h for r in self.rules.values() for h in r.hf if h not in have]
        if missing:
            raise CheckpointError(f"{hf.directory}: missing tensors for the Megatron layout: {', '.join(missing[:4])}")
        self._get = mapping.megatron_getter(hf.cfg, hf.get)
        empty = mapping.megatron_getter(hf.cfg, lambda h: torch.empty(hf.shape(h), dtype=hf.dtype(h), device="meta"))
        self._meta = {name: self._fuse(empty, name) for name in self.rules}  # shapes and dtypes, nothing read

    def _fuse(self, getter: mapping.Getter, name: str) -> torch.Tensor:
        try:
            return getter(name)
        except mapping.MappingError as exc:
            raise CheckpointError(f"{self.directory}: {exc}") from None

    @property
    def names(self) -> list[str]:
        return list(self.rules)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name].dtype

    def get(self, name: str) -> torch.Tensor:
        """The fused tensor (KeyError for a name outside the layout, as `mapping.megatron_getter`)."""
        return self._fuse(self._get, name)

    def close(self) -> None:
        self.hf.close()


def open_checkpoint(
    directory: Path, rope_from: Path | None = None, check_layout: bool = True, tokenizer: Path | None = None
) -> Source:
    """Detect the format of `directory` and open it lazily; every bad input raises a one-line CheckpointError.

    `rope_from` (an HF config.json or params.json) supplies rope settings a torch_dist metadata lacks, and
    with `tokenizer` (a tekken.json) completes a Megatron-LM checkpoint that has no metadata of ours. A
    Megatron-LM top directory is read at the iteration its `latest_checkpointed_iteration.txt` names.
    `check_layout=False` skips matching tensor names and shapes against the config (the merge plans and
    reports those per tensor itself); files, headers and FP8 scales are checked either way."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: input directory does not exist")
    if PARTIAL_TAG in d.name or PARTIAL_TAG in d.parent.name:  # also where no metadata of ours says so
        raise CheckpointError(f"{d}: is a partial (interrupted) output, not a checkpoint; re-run the tool")
    d = megatron_lm.resolve(d)
    if is_torch_dist(d) or (d / META_FILE).is_file():
        return TorchDistCheckpoint(d, rope_from, check_layout, tokenizer)
    has_hf = (d / SINGLE_FILE).is_file() or (d / INDEX_FILE).is_file()
    if has_hf:  # a hub repo may ship both layouts (Devstral Small 2 does): HF is read, checked against params.json
        if not (d / "config.json").is_file():
            raise CheckpointError(f"{d}: HF weights without config.json")
        native_cfg = _native_config(d / "params.json")[0] if (d / "params.json").is_file() else None
        return HFCheckpoint(d, native_cfg, check_layout)
    if any(d.glob("consolidated*.safetensors")):
        if not (d / "params.json").is_file():
            raise CheckpointError(f"{d}: consolidated.safetensors without params.json")
        return NativeCheckpoint(d, check_layout)
    raise CheckpointError(f"{d}: no model.safetensors, index, consolidated.safetensors or torch_dist checkpoint found")
