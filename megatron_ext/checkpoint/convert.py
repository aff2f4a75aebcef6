"""Convert between HF, Mistral-native and Megatron torch_dist checkpoints, streaming one tensor at a time.

`convert()` detects the input format, validates the target TP/PP, maps names through
`checkpoint.mapping`, and writes into a hidden temporary directory that is renamed only when complete.
torch_dist stores global tensors, so one file set serves every TP/PP the model allows: `--tp/--pp`
are validated and recorded, and torch_dist -> torch_dist "re-sharding" is a validated copy. torch_dist
outputs use Megatron-LM's layout (`release/` + `latest_checkpointed_iteration.txt`, `checkpoint/megatron_lm.py`);
`megatron-lm` writes a text-only model under Megatron-LM's GPTModel keys (`embedding.*`, `decoder.*`,
`output_layer.*`) instead of our `language_model.*` ones. `lora` (an adapter directory of a LoRA SFT run)
merges the adapters into the input's weights on the way (`checkpoint/lora.py`): the input must be their base.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from megatron_ext.checkpoint import mapping
from megatron_ext.checkpoint.atomic import CheckpointError, atomic_dir
from megatron_ext.checkpoint.export_files import hf_config_or_refusal, require_audio, write_hf_files
from megatron_ext.checkpoint.lora import LoraMergedSource
from megatron_ext.checkpoint.megatron_lm import common_state, gpt_key, move_into_release
from megatron_ext.checkpoint.metadata import (
    TOKENIZER_FILE,
    CheckpointMeta,
    command_line,
    read_meta,
    sha256_file,
    write_meta,
)
from megatron_ext.checkpoint.mistral_native import convert_name, half_to_interleaved, params_from_config, rope_heads
from megatron_ext.checkpoint.published import published_record
from megatron_ext.checkpoint.safetensors_writer import SafetensorsWriter
from megatron_ext.checkpoint.source import Source, all_finite, open_checkpoint
from megatron_ext.checkpoint.source_hashes import source_sha256
from megatron_ext.checkpoint.torch_dist_io import TorchDistWriter
from megatron_ext.config import ConfigError, ModelConfig
from megatron_ext.parallel_layout import validate_parallelism

Target = Literal["megatron", "megatron-lm", "hf", "mistral"]
TARGETS = ("megatron", "megatron-lm", "hf", "mistral")
TORCH_DIST_TARGETS = ("megatron", "megatron-lm")


def validate_parallel(cfg: ModelConfig, tp: int, pp: int) -> None:
    """One-line refusal when `tp`/`pp` do not fit the model (the rules of `parallel_layout`)."""
    try:
        validate_parallelism(cfg, tp=tp, pp=pp)
    except ConfigError as exc:
        raise CheckpointError(f"--tp {tp} --pp {pp} not allowed: {exc}") from None


@dataclass
class ConversionReport:
    """What a conversion did (printed by the CLI, used by the benchmark)."""

    input_description: str
    output: Path
    target: str
    tensors: int
    bytes_written: int
    seconds: float
    already_complete: bool = False  # --output already held this conversion (verified): nothing was written


def _hf_stream(inp: Source) -> Iterator[tuple[str, torch.Tensor]]:
    if inp.naming == "megatron":
        yield from mapping.megatron_to_hf(inp.cfg, inp.get)
    else:
        for name in mapping.hf_names(inp.cfg):
            yield name, inp.get(name)


def _megatron_stream(inp: Source) -> Iterator[tuple[str, torch.Tensor]]:
    if inp.naming == "megatron":
        for name in mapping.megatron_names(inp.cfg):
            yield name, inp.get(name)
    else:
        yield from mapping.hf_to_megatron(inp.cfg, inp.get)


def _native_stream(inp: Source) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in _hf_stream(inp):
        if name == mapping.HF_POSITIONS:
            continue  # not stored in Mistral-native files
        heads = rope_heads(name, inp.cfg)
        yield (
            convert_name(name, inp.cfg.hf_architecture, to_hf=False),
            (half_to_interleaved(t, heads).contiguous() if heads else t),
        )


class _Hasher(threading.Thread):
    """sha256 of the source files in a background thread (hashlib releases the GIL); known hashes are
    reused unless `rehash` (see `source_hashes.py`)."""

    def __init__(self, files: list[Path], rehash: bool) -> None:
        super().__init__(daemon=True)
        self.files, self.rehash, self.result, self.error = files, rehash, [], None

    def run(self) -> None:
        try:
            hashes = source_sha256(self.files, reuse=not self.rehash)
            self.result = [
                {"path": str(p), "bytes": p.stat().st_size, "sha256": h}
                for p, h in zip(self.files, hashes, strict=True)
            ]
        except OSError as exc:
            self.error = exc


def _write_stream(stream: Iterator[tuple[str, torch.Tensor]], writer, total: int, progress: bool, source: Path) -> int:
    n = 0
    with tqdm(total=total, unit="tensor", disable=not progress, dynamic_ncols=True, desc="convert") as bar:
        start = time.perf_counter()
        for name, t in stream:
            if not all_finite(t):
                raise CheckpointError(f"{source}: tensor {name} holds NaN or Inf values; not converting it")
            writer.write(name, t)
            n += 1
            gb = writer.bytes_written / 1e9
            bar.set_postfix_str(f"{gb:.2f} GB, {gb / max(time.perf_counter() - start, 1e-9):.2f} GB/s", refresh=False)
            bar.update(1)
            del t
    return n


def _hf_dtype_name(inp: Source) -> str:
    first = mapping.hf_names(inp.cfg)[0] if inp.naming == "hf" else mapping.megatron_names(inp.cfg)[-1]
    return str(inp.get(first).dtype).removeprefix("torch.")


def convert(
    input_dir: Path,
    output_dir: Path,
    to: Target,
    tp: int = 1,
    pp: int = 1,
    overwrite: bool = False,
    rope_from: Path | None = None,
    progress: bool = True,
    command: str | None = None,
    rehash: bool = False,
    shard_bytes: int | None = None,
    carry: tuple[Path, ...] = (),
    tokenizer: Path | None = None,
    lora: Path | None = None,
) -> ConversionReport:
    """Convert `input_dir` (any supported format) to `to` in `output_dir`; see the module docstring.
    `shard_bytes` splits safetensors outputs (default: 5 GiB shards for HF, one file for Mistral-native);
    `carry` files are copied into the output (the merge's provenance); `rope_from` and `tokenizer` complete a
    torch_dist input that lacks our metadata (Megatron-LM's own); `lora` merges an adapter directory's
    LoRA adapters into the weights (W + alpha/rank B A)."""
    if to not in TARGETS:
        raise CheckpointError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    start = time.perf_counter()
    inp = open_checkpoint(Path(input_dir), rope_from, tokenizer=tokenizer)
    try:
        if lora is not None:
            inp = LoraMergedSource(inp, Path(lora))
        validate_parallel(inp.cfg, tp, pp)
        out = Path(output_dir)
        reusable = lora is None and not overwrite and to == "megatron" and out.is_dir()
        if reusable and _holds_conversion(out, inp, tp, pp):
            return ConversionReport(inp.description, out, to, 0, 0, time.perf_counter() - start, already_complete=True)
        # Refusals that depend only on the input come before any tensor is written.
        if to == "megatron-lm" and inp.cfg.has_audio:
            raise CheckpointError(
                f"{inp.directory}: --to megatron-lm writes GPTModel keys, for text-only models; this one has an "
                "audio stack (use --to megatron)"
            )
        hf_cfg = hf_config_or_refusal(inp.cfg) if to == "hf" else None
        audio = require_audio(inp.cfg, inp.tokenizer, inp.directory) if to not in TORCH_DIST_TARGETS else None
        params = _native_params(inp.cfg, audio) if to == "mistral" else None
        hasher = _Hasher(inp.files if to in TORCH_DIST_TARGETS else [], rehash)  # only torch_dist records sources
        hasher.start()
        with atomic_dir(Path(output_dir), overwrite) as tmp:
            if to in TORCH_DIST_TARGETS:
                writer = TorchDistWriter(tmp)
                total = len(mapping.megatron_names(inp.cfg))
                stream = _megatron_stream(inp)
                if to == "megatron-lm":
                    stream = ((gpt_key(name), t) for name, t in stream)
            else:
                names = mapping.hf_names(inp.cfg)
                if to == "mistral":
                    names = [
                        convert_name(n, inp.cfg.hf_architecture, to_hf=False)
                        for n in names
                        if n != mapping.HF_POSITIONS
                    ]
                default_bytes = 5 << 30 if to == "hf" else 1 << 62
                writer = SafetensorsWriter(
                    tmp,
                    names,
                    max_shard_bytes=shard_bytes or default_bytes,
                    stem="model" if to == "hf" else "consolidated",
                    index_metadata=_index_metadata(inp, to),
                )
                total = len(names)
                stream = _hf_stream(inp) if to == "hf" else _native_stream(inp)
            try:
                n = _write_stream(stream, writer, total, progress, inp.directory)
                if isinstance(writer, TorchDistWriter):
                    writer.finish(common_state(inp.cfg, 0, tp, pp))
                else:
                    writer.finish()
            finally:
                writer.close()
            if inp.tokenizer is not None:
                shutil.copyfile(inp.tokenizer, tmp / TOKENIZER_FILE)
            for path in carry:
                shutil.copyfile(path, tmp / path.name)
            hasher.join()
            if hasher.error:
                raise CheckpointError(f"hashing sources failed: {hasher.error}")
            if to == "hf":
                hf_cfg["dtype"] = _hf_dtype_name(inp)
                _write_json(tmp / "config.json", hf_cfg)
                write_hf_files(tmp, inp.cfg, audio)
            elif to == "mistral":
                _write_json(tmp / "params.json", params)
            else:
                _write_meta(tmp, inp, tp, pp, hasher.result, command)
                move_into_release(tmp)
        return ConversionReport(
            inp.description, Path(output_dir), to, n, writer.bytes_written, time.perf_counter() - start
        )
    finally:
        inp.close()


def _holds_conversion(out: Path, inp: Source, tp: int, pp: int) -> bool:
    """True when `out` is a complete, verified torch_dist conversion of `inp`'s current files at this TP/PP;
    an output that claims to be one but fails verification is refused, naming the file."""
    try:
        meta = read_meta(out, check_files=False)
    except CheckpointError:
        return False
    recorded = [(s.get("path"), s.get("sha256")) for s in meta.sources if isinstance(s, dict)]
    same = (
        meta.tool == "convert"
        and "lora" not in meta.extra  # a merged export of this input is not its conversion
        and meta.parallel == {"tp": tp, "pp": pp}
        and meta.extra.get("input") == str(inp.directory)
        and [p for p, _ in recorded] == [str(p) for p in inp.files]
    )
    if not same or [h for _, h in recorded] != source_sha256(inp.files):
        return False
    try:
        read_meta(out)
    except CheckpointError as exc:
        raise CheckpointError(f"{out}: holds this conversion, but {exc}; remove it or pass --overwrite") from None
    return True


def _native_params(cfg: ModelConfig, audio: dict | None) -> dict:
    try:
        return params_from_config(cfg, audio)
    except ConfigError as exc:
        raise CheckpointError(f"cannot express this model as Mistral-native params.json: {exc}") from None


def _index_metadata(inp: Source, to: str) -> dict[str, str]:
    """What a sharded export's index records about its making (safetensors index metadata holds strings)."""
    return {"tool": "convert", "to": to, "input_format": inp.kind, "input": str(inp.directory)}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_meta(tmp: Path, inp: Source, tp: int, pp: int, sources: list, command: str | None) -> None:
    tok = tmp / TOKENIZER_FILE
    meta = CheckpointMeta(
        model=inp.cfg,
        tokenizer_sha256=sha256_file(tok) if tok.is_file() else None,
        sources=sources,
        command=command or command_line(),
        tool="convert",
        parallel={"tp": tp, "pp": pp},
        extra={
            "input_format": inp.kind,
            "input": str(inp.directory),
            **published_record(inp.dropped, inp.activation_scales),
            **({"lora": str(inp.adapter_dir)} if isinstance(inp, LoraMergedSource) else {}),
        },
    )
    write_meta(tmp, meta)
