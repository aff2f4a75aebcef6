"""Run one merge: validate the parents, plan the output, stream tensor by tensor, write atomically.

The output is Voxtral's layout (it carries the audio stack): the audio tower and projector are copied
byte for byte from Voxtral, decoder tensors are merged by the method, embeddings and LM head by the
tokenizer-aware rules. Shards are written into `.<output>.partial-merge/` and renamed when complete; a
re-run with the same plan resumes after the last finished shard (DELLA draws are seeded per tensor,
so a resumed result is identical). Reads run one tensor ahead in a thread and writes behind in another,
so disk and compute overlap while at most a few tensors are in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from megatron_ext.config import ConfigError, ModelConfig, RopeConfig
from megatron_ext.merge.embeddings import merge_vocab_rows
from megatron_ext.merge.methods import METHODS, MergeParams, TensorContext
from megatron_ext.merge.names import classify, num_layers
from megatron_ext.merge.parents import HFParent, ParentError, open_parent
from megatron_ext.merge.safetensors_io import header_bytes, plan_shards, shard_names, tensor_bytes
from megatron_ext.tokenizer.align import AlignmentError, TokenizerAlignment, align_tokenizers
from megatron_ext.tokenizer.tekken_builder import write_tekken

log = logging.getLogger(__name__)
DECODER_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "kv_channels", "vocab_size")
SLERP_VERBATIM = frozenset({"[TRANSCRIBE]", "[AUDIO]", "[BEGIN_AUDIO]"})
PROVENANCE_FILE = "merge.json"


class MergeError(ValueError):
    """A merge cannot run: inconsistent parents, bad parameters or a bad output path."""


@dataclass(frozen=True)
class MergeJob:
    """Everything one merge needs; `rope_from` or `rope` must be set (a merge never drops rope settings)."""

    devstral: Path
    voxtral: Path
    output: Path
    params: MergeParams
    base: Path | None = None
    tokenizer_map: Path | None = None
    rope_from: Literal["devstral", "voxtral"] | None = None
    rope: RopeConfig | None = None
    out_format: Literal["hf", "megatron"] = "hf"
    min_row_norm: float = 1e-6
    shard_bytes: int = 5 * 1024**3
    lookahead_bytes: int = 512 * 1024**2
    progress: bool = True


@dataclass
class Item:
    """One output tensor: where it comes from and how it is produced."""

    out_name: str
    kind: Literal["copy", "merge", "vocab", "skip_shape"]
    vox_name: str
    dev_name: str | None
    base_name: str | None
    dtype: torch.dtype
    shape: tuple[int, ...]
    layer: int | None = None
    is_mlp: bool = False


@dataclass
class Summary:
    output: Path
    tensors: dict[str, int] = field(default_factory=Counter)
    special_rows: dict[str, int] = field(default_factory=Counter)
    skipped_shape_mismatch: list[str] = field(default_factory=list)
    resumed_shards: int = 0


# ---- validation ------------------------------------------------------------------------------------
def _check_configs(dev: HFParent, vox: HFParent, base: HFParent | None) -> None:
    for other, label in ((vox, "voxtral"), (base, "base")):
        if other is None:
            continue
        for f in DECODER_FIELDS:
            a, b = getattr(dev.config.decoder, f), getattr(other.config.decoder, f)
            if a != b:
                raise MergeError(f"parents disagree on decoder.{f}: devstral ({dev.path})={a}, {label} ({other.path})={b}")
    if not vox.config.has_audio:
        raise MergeError(f"{vox.path}: the Voxtral parent has no audio encoder")


def _choose_rope(job: MergeJob, dev: HFParent, vox: HFParent) -> RopeConfig:
    if job.rope is not None and job.rope_from is not None:
        raise MergeError("give either --rope-from or explicit rope values, not both")
    if job.rope is not None:
        return job.rope
    if job.rope_from == "devstral":
        return dev.config.decoder.rope
    if job.rope_from == "voxtral":
        return vox.config.decoder.rope
    raise MergeError("rope settings must be chosen explicitly: --rope-from devstral|voxtral or explicit --rope-* values")


def _alignment(job: MergeJob, dev: HFParent, vox: HFParent) -> tuple[TokenizerAlignment, dict[str, Any]]:
    try:
        computed, merged_tok = align_tokenizers(dev.tokenizer_path, vox.tokenizer_path)
    except AlignmentError as exc:
        raise MergeError(str(exc)) from None
    if job.tokenizer_map is not None:
        given = TokenizerAlignment.load(job.tokenizer_map)
        for side, mine in (("devstral", computed.devstral_tokenizer_sha256), ("voxtral", computed.voxtral_tokenizer_sha256)):
            if getattr(given, f"{side}_tokenizer_sha256") != mine:
                raise MergeError(f"{job.tokenizer_map}: made for another {side} tokenizer than {getattr(job, side)}/tekken.json")
        if given.model_dump() != computed.model_dump():
            log.warning("tokenizer map %s differs from the default alignment; using the given map", job.tokenizer_map)
            merged_tok["special_tokens"] = _special_list(given)
        computed = given
    vocab = dev.config.decoder.vocab_size
    if computed.vocab_size > vocab:
        raise MergeError(f"tokenizer vocab {computed.vocab_size} exceeds the checkpoints' vocab_size {vocab}")
    return computed, merged_tok


def _special_list(alignment: TokenizerAlignment) -> list[dict]:
    from megatron_ext.tokenizer.tekken_builder import special_token_list

    return special_token_list(alignment.merged_specials)


# ---- planning --------------------------------------------------------------------------------------
def plan(dev: HFParent, vox: HFParent, base: HFParent | None) -> list[Item]:
    """Output tensors in Voxtral's order; missing tensors on either side are one error listing them."""
    dev_by_key = {classify(n).key: n for n in dev.names if classify(n).role != "audio"}
    base_by_key = {} if base is None else {classify(n).key: n for n in base.names}
    if num_layers(dev.names) != num_layers(vox.names):
        raise MergeError(
            f"parents have different decoder layer counts: devstral {num_layers(dev.names)}, voxtral {num_layers(vox.names)}"
        )
    items, seen, missing = [], set(), []
    for name in vox.names:
        info = classify(name)
        if info.role in ("audio", "other"):
            items.append(Item(name, "copy", name, None, None, vox.dtype(name), vox.shape(name)))
            continue
        dname = dev_by_key.get(info.key)
        if dname is None:
            missing.append(f"devstral lacks {name}")
            continue
        seen.add(info.key)
        bname = base_by_key.get(info.key) if base is not None else None
        if base is not None and bname is None:
            missing.append(f"base lacks {name}")
        kind = "vocab" if info.role in ("embedding", "lm_head") else "merge"
        if dev.shape(dname) != vox.shape(name) or (bname and base.shape(bname) != vox.shape(name)):
            if kind == "vocab":
                raise MergeError(
                    f"vocabulary rows disagree: {dname} {list(dev.shape(dname))} vs {name} {list(vox.shape(name))}"
                )
            kind = "skip_shape"
        items.append(Item(name, kind, name, dname, bname, dev.dtype(dname) if kind != "skip_shape" else vox.dtype(name),
                          vox.shape(name), info.layer, info.is_mlp))
    missing += [f"voxtral lacks {n}" for k, n in dev_by_key.items() if k not in seen]
    if missing:
        raise MergeError(f"missing tensors ({len(missing)}): {'; '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    return items


# ---- execution -------------------------------------------------------------------------------------
def _produce(item: Item, tensors: dict[str, torch.Tensor], job: MergeJob, alignment: TokenizerAlignment,
             summary: Summary) -> torch.Tensor:
    vox = tensors["vox"]
    if item.kind in ("copy", "skip_shape"):
        if item.kind == "skip_shape":
            log.warning("shape mismatch, kept Voxtral's tensor: %s", item.out_name)
            summary.skipped_shape_mismatch.append(item.out_name)
        return vox
    method = METHODS[job.params.method]
    ctx = TensorContext(item.out_name, item.layer, item.is_mlp)
    base = tensors.get("base") if method.uses_base else None
    if item.kind == "vocab":
        verbatim = SLERP_VERBATIM if job.params.method == "slerp" else frozenset()
        out, stats = merge_vocab_rows(tensors["dev"], vox, base, alignment, method, job.params, ctx,
                                      job.min_row_norm, verbatim)
        summary.special_rows.update({f"{item.out_name}:{k}": v for k, v in stats.items()})
        return out
    return method.merge(tensors["dev"], vox, base, job.params, ctx)


def _reader(item: Item, dev: HFParent, vox: HFParent, base: HFParent | None) -> dict[str, torch.Tensor]:
    out = {"vox": vox.read(item.vox_name)}
    if item.kind in ("merge", "vocab"):
        out["dev"] = dev.read(item.dev_name)
        if base is not None and item.base_name:
            out["base"] = base.read(item.base_name)
    return out


def _out_bytes(item: Item) -> int:
    return item.dtype.itemsize * int(torch.Size(item.shape).numel())


def _in_flight_bytes(item: Item) -> int:
    """Inputs read for an item (Voxtral's tensor, plus Devstral's and the base's when merged)."""
    return _out_bytes(item) * (1 if item.kind in ("copy", "skip_shape") else 3)


def _plan_id(job: MergeJob, items: list[Item], parents: dict[str, HFParent]) -> str:
    """Identity of a merge for resuming: parameters + output table + parents' tensor tables (no content)."""
    h = hashlib.sha256(json.dumps(job.params.to_dict(), sort_keys=True).encode())
    for it in items:
        h.update(f"{it.out_name}|{it.kind}|{it.dtype}|{list(it.shape)}\n".encode())
    for label, p in parents.items():
        h.update(f"{label}|{p.path.resolve()}\n".encode())
        for e in p.entries.values():
            h.update(f"{e.path.name}|{e.start}|{e.end}|{e.path.stat().st_size}|{e.path.stat().st_mtime_ns}\n".encode())
    h.update(str(job.min_row_norm).encode())
    return h.hexdigest()


def run_merge(job: MergeJob) -> Summary:
    """Merge `job.devstral` and `job.voxtral` into `job.output` (see module docstring)."""
    if job.out_format != "hf":
        raise MergeError("--format megatron needs the torch_dist writer (megatron_ext/checkpoint/torch_dist_io.py)")
    try:
        job.params.validate()
    except ValueError as exc:
        raise MergeError(str(exc)) from None
    try:
        dev, vox = open_parent(job.devstral), open_parent(job.voxtral)
        base = open_parent(job.base) if job.base is not None else None
    except ParentError as exc:
        raise MergeError(str(exc)) from None
    if base is not None and not METHODS[job.params.method].uses_base:
        raise MergeError(f"--base is only used by della, not {job.params.method}")
    _check_configs(dev, vox, base)
    rope = _choose_rope(job, dev, vox)
    alignment, merged_tok = _alignment(job, dev, vox)
    items = plan(dev, vox, base)
    parents = {"devstral": dev, "voxtral": vox} | ({"base": base} if base is not None else {})
    out_cfg = _output_config(vox.config, rope, alignment)

    final = Path(job.output)
    plan_id = _plan_id(job, items, parents)
    if final.exists():
        done = final / PROVENANCE_FILE
        if done.is_file() and json.loads(done.read_text()).get("plan_id") == plan_id:
            log.info("%s already holds this merge; nothing to do", final)
            return Summary(final)
        raise MergeError(f"{final} already exists (remove it or choose another --output)")
    tmp = final.with_name(f".{final.name}.partial-merge")  # hidden; loaders refuse ".partial-" names
    summary = Summary(final, tensors=Counter(it.kind for it in items))
    _prepare_tmp(tmp, plan_id)
    try:
        _write_shards(tmp, items, job, dev, vox, base, alignment, summary)
        provenance = _provenance(job, plan_id, parents, alignment, rope, summary)
        _write_metadata(tmp, out_cfg, vox, merged_tok, alignment, provenance)
    except ParentError as exc:
        raise MergeError(str(exc)) from None
    (tmp / "plan_id").unlink()
    tmp.rename(final)
    return summary


def _prepare_tmp(tmp: Path, plan_id: str) -> None:
    marker = tmp / "plan_id"
    if tmp.exists() and not (marker.is_file() and marker.read_text() == plan_id):
        shutil.rmtree(tmp)  # a partial output of another merge: start over
    tmp.mkdir(parents=True, exist_ok=True)
    marker.write_text(plan_id)


def _write_shards(tmp: Path, items: list[Item], job: MergeJob, dev: HFParent, vox: HFParent,
                  base: HFParent | None, alignment: TokenizerAlignment, summary: Summary) -> None:
    by_name = {it.out_name: it for it in items}
    shards = plan_shards([(it.out_name, it.dtype, it.shape) for it in items], job.shard_bytes)
    names = shard_names(len(shards))
    todo: list[tuple[Path, list]] = []
    for fname, shard in zip(names, shards):
        if (tmp / fname).is_file() and (tmp / f"{fname}.state.json").is_file():
            summary.resumed_shards += 1
            _restore_state(tmp / f"{fname}.state.json", dev, vox, base, summary)
            continue
        todo.append((tmp / fname, shard))
    index = {n: fname for fname, shard in zip(names, shards) for n, _, _ in shard}
    (tmp / "model.safetensors.index.json.tmp").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    queue = [by_name[n] for _, shard in todo for n, _, _ in shard]
    total = sum(_out_bytes(it) for it in queue)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not job.progress)
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        pending: list[tuple[Item, Future]] = []
        nxt = 0

        def fill() -> None:
            nonlocal nxt
            budget = sum(_in_flight_bytes(it) for it, _ in pending)
            while nxt < len(queue) and (not pending or budget < job.lookahead_bytes):
                it = queue[nxt]
                pending.append((it, reader.submit(_reader, it, dev, vox, base)))
                budget += _in_flight_bytes(it)
                nxt += 1

        for path, shard in todo:
            part = path.with_name(path.name + ".tmp")
            with open(part, "wb") as f:
                f.write(header_bytes(shard, {"format": "pt"}))
                last_write: Future | None = None
                for name, dtype, shape in shard:
                    fill()
                    it, fut = pending.pop(0)
                    assert it.out_name == name
                    out = _produce(it, fut.result(), job, alignment, summary)
                    if out.dtype != dtype or tuple(out.shape) != tuple(shape):
                        raise MergeError(f"{name}: produced {out.dtype} {list(out.shape)}, planned {dtype} {list(shape)}")
                    if last_write is not None:
                        last_write.result()
                    last_write = writer.submit(f.write, tensor_bytes(out))
                    bar.update(out.numel() * out.element_size())
                if last_write is not None:
                    last_write.result()
                f.flush()
            state = {"crc": _crc_by_parent(shard, by_name, dev, vox, base),
                     "special_rows": {k: v for k, v in summary.special_rows.items() if k.split(":")[0] in index
                                      and index[k.split(":")[0]] == path.name},
                     "skipped": [n for n in summary.skipped_shape_mismatch if index[n] == path.name]}
            _write_json(path.with_name(path.name + ".state.json"), state)
            part.rename(path)
    bar.close()


def _crc_by_parent(shard: list, by_name: dict[str, Item], dev: HFParent, vox: HFParent,
                   base: HFParent | None) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {"devstral": {}, "voxtral": {}, "base": {}}
    for n, _, _ in shard:
        it = by_name[n]
        out["voxtral"][it.vox_name] = vox.crc[it.vox_name]
        if it.kind in ("merge", "vocab"):
            out["devstral"][it.dev_name] = dev.crc[it.dev_name]
            if base is not None and it.base_name:
                out["base"][it.base_name] = base.crc[it.base_name]
    return out


def _restore_state(path: Path, dev: HFParent, vox: HFParent, base: HFParent | None, summary: Summary) -> None:
    """Checksums and row statistics of a shard finished by an earlier (interrupted) run."""
    data = json.loads(path.read_text())
    for label, p in (("devstral", dev), ("voxtral", vox), ("base", base)):
        if p is not None:
            p.crc.update(data["crc"].get(label, {}))
    summary.special_rows.update(data["special_rows"])
    summary.skipped_shape_mismatch += data["skipped"]


def _output_config(vox_cfg: ModelConfig, rope: RopeConfig, alignment: TokenizerAlignment) -> ModelConfig:
    decoder = dataclasses.replace(vox_cfg.decoder, rope=rope)
    try:
        audio_id = alignment.merged_rank("[AUDIO]")
    except KeyError:
        raise MergeError("merged tokenizer has no [AUDIO] token") from None
    return dataclasses.replace(vox_cfg, decoder=decoder, audio_token_id=audio_id)


def _provenance(job: MergeJob, plan_id: str, parents: dict[str, HFParent], alignment: TokenizerAlignment,
                rope: RopeConfig, summary: Summary) -> dict[str, Any]:
    return {
        "plan_id": plan_id,
        "method": job.params.method,
        "params": job.params.to_dict(),
        "seed": job.params.seed,
        "rope": dataclasses.asdict(rope),
        "rope_from": job.rope_from or "explicit",
        "parents": {k: {"path": str(p.path), "format": p.format, "content_sha256": p.content_hash()}
                    for k, p in parents.items()},
        "tokenizer_map_sha256": alignment.sha256(),
        "min_row_norm": job.min_row_norm,
        "tensors": dict(summary.tensors),
        "special_rows": dict(summary.special_rows),
        "skipped_shape_mismatch": summary.skipped_shape_mismatch,
        "hash_note": "content_sha256 = sha256(config.json, tekken.json, tensor table with per-tensor CRC32)",
    }


def _write_metadata(tmp: Path, cfg: ModelConfig, vox: HFParent, merged_tok: dict, alignment: TokenizerAlignment,
                    provenance: dict) -> None:
    try:
        hf = cfg.to_hf()
    except ConfigError as exc:
        raise MergeError(f"chosen rope cannot be stored in the Voxtral HF layout: {exc}") from None
    hf["dtype"] = vox.hf_config.get("dtype", "bfloat16")
    hf["merge"] = {k: provenance[k] for k in ("method", "params", "rope_from", "tokenizer_map_sha256")}
    _write_json(tmp / "config.json", hf)
    write_tekken(merged_tok, tmp / "tekken.json")
    (tmp / "tokenizer_map.json").write_text(alignment.model_dump_json(indent=2) + "\n")
    _write_json(tmp / PROVENANCE_FILE, provenance)
    index_tmp = tmp / "model.safetensors.index.json.tmp"
    index = json.loads(index_tmp.read_text())
    if len(set(index["weight_map"].values())) > 1:
        index_tmp.rename(tmp / "model.safetensors.index.json")
    else:
        index_tmp.unlink()
    for state in tmp.glob("*.state.json"):
        state.unlink()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
