"""Run one merge: validate the parents, plan the output, stream tensor by tensor, write atomically.

The output is Voxtral's layout (it carries the audio stack): the audio tower and projector are copied
byte for byte from Voxtral, decoder tensors are merged by the method, embeddings and LM head by the
tokenizer-aware rules. The output is an atomic, resumable directory (`checkpoint/atomic.py`): shards are
written into its hidden partial sibling, which is fsynced and renamed when complete; a re-run with the same
plan adopts an abandoned partial and resumes after its last finished shard (DELLA draws are seeded per
tensor, so a resumed result is identical). Reads run one tensor ahead in a thread and writes behind in another,
so disk and compute overlap while at most a few tensors are in memory; for HF output a linear or SLERP
merge with accelerations on (`accel/`) streams every merged tensor in row blocks (`row_stream.py`), so
merges and writes overlap. HF shards are written with O_DIRECT (`checkpoint/safetensors_writer.ShardFile`):
laid out so tensor data and the blocks' buffers sit on 4 KiB boundaries, they go to the device without the
page-cache copy that took a core from the merge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from megatron_ext.checkpoint.atomic import (
    LOCK_FILE,
    PENDING_SUFFIX,
    RESUME_FILE,
    CheckpointError,
    atomic_dir,
)
from megatron_ext.checkpoint.convert import convert
from megatron_ext.checkpoint.direct_io import ALIGN
from megatron_ext.checkpoint.export_files import hf_config_or_refusal, write_hf_files
from megatron_ext.checkpoint.megatron_lm import common_state, move_into_release, resolve
from megatron_ext.checkpoint.metadata import (
    TOKENIZER_FILE,
    CheckpointMeta,
    command_line,
    file_records,
    read_meta,
    sha256_file,
    verify_files,
    write_meta,
)
from megatron_ext.checkpoint.published import published_record
from megatron_ext.checkpoint.safetensors_writer import PlannedShards, tensor_bytes
from megatron_ext.checkpoint.torch_dist_io import TorchDistWriter
from megatron_ext.config import ModelConfig, RopeConfig
from megatron_ext.errors import ProjectError
from megatron_ext.merge import accel
from megatron_ext.merge.embeddings import merge_vocab_rows
from megatron_ext.merge.methods import METHODS, MergeParams, TensorContext
from megatron_ext.merge.names import classify, num_layers
from megatron_ext.merge.parents import Parent, ParentError, detect_naming, is_finite, open_parent
from megatron_ext.merge.row_stream import BlockBuffers, row_blocks, streamable
from megatron_ext.tokenizer.align import AlignmentError, TokenizerAlignment, align_tokenizers
from megatron_ext.tokenizer.tekken_builder import write_tekken

log = logging.getLogger(__name__)
DECODER_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
)
PROVENANCE_FILE = "merge.json"


class MergeError(ProjectError, ValueError):
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
    out_format: Literal["hf", "megatron", "mistral"] = "hf"
    min_row_norm: float = 1e-6
    shard_bytes: int | None = None  # safetensors outputs: None = 5 GiB shards for HF, one file for Mistral-native
    # Inputs read ahead while the current tensor is merged (Mistral-Small's ffn matrices: ~1 GB in flight).
    lookahead_bytes: int = 1536 * 1024**2
    # Merged outputs queued for writing while the next tensors are merged (the queue is memory).
    write_behind_bytes: int = 256 * 1024**2
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
    streamed: bool = False  # merged and written in row blocks (`row_stream.py`)


@dataclass
class Summary:
    output: Path
    tensors: dict[str, int] = field(default_factory=Counter)
    special_rows: dict[str, int] = field(default_factory=Counter)
    skipped_shape_mismatch: list[str] = field(default_factory=list)
    resumed_shards: int = 0
    already_complete: bool = False


# ---- validation ------------------------------------------------------------------------------------
def _check_configs(dev: Parent, vox: Parent, base: Parent | None) -> None:
    for other, label in ((vox, "voxtral"), (base, "base")):
        if other is None:
            continue
        for f in DECODER_FIELDS:
            a, b = getattr(dev.config.decoder, f), getattr(other.config.decoder, f)
            if a != b:
                raise MergeError(
                    f"parents disagree on decoder.{f}: devstral ({dev.path})={a}, {label} ({other.path})={b}"
                )
    if not vox.config.has_audio:
        raise MergeError(f"{vox.path}: the Voxtral parent has no audio encoder")


def _choose_rope(job: MergeJob, dev: Parent, vox: Parent) -> RopeConfig:
    if job.rope is not None and job.rope_from is not None:
        raise MergeError("give either --rope-from or explicit rope values, not both")
    if job.rope is not None:
        return job.rope
    if job.rope_from == "devstral":
        return dev.config.decoder.rope
    if job.rope_from == "voxtral":
        return vox.config.decoder.rope
    raise MergeError(
        "rope settings must be chosen explicitly: --rope-from devstral|voxtral or explicit --rope-* values"
    )


def _alignment(job: MergeJob, dev: Parent, vox: Parent) -> tuple[TokenizerAlignment, dict[str, Any]]:
    try:
        computed, merged_tok = align_tokenizers(dev.tokenizer_path, vox.tokenizer_path)
    except AlignmentError as exc:
        raise MergeError(str(exc)) from None
    if job.tokenizer_map is not None:
        given = TokenizerAlignment.load(job.tokenizer_map)
        for side, mine in (
            ("devstral", computed.devstral_tokenizer_sha256),
            ("voxtral", computed.voxtral_tokenizer_sha256),
        ):
            if getattr(given, f"{side}_tokenizer_sha256") != mine:
                raise MergeError(
                    f"{job.tokenizer_map}: made for another {side} tokenizer than {getattr(job, side)}/tekken.json"
                )
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
def plan(dev: Parent, vox: Parent, base: Parent | None) -> list[Item]:
    """Output tensors in Voxtral's order; missing tensors on either side are one error listing them."""
    dev_by_key = {classify(n).key: n for n in dev.names if classify(n).role != "audio"}
    base_by_key = {} if base is None else {classify(n).key: n for n in base.names}
    n_dev, n_vox = num_layers(dev.names), num_layers(vox.names)
    if n_dev != n_vox:
        raise MergeError(f"parents have different decoder layer counts: devstral {n_dev}, voxtral {n_vox}")
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
        items.append(
            Item(
                name,
                kind,
                name,
                dname,
                bname,
                dev.dtype(dname) if kind != "skip_shape" else vox.dtype(name),
                vox.shape(name),
                info.layer,
                info.is_mlp,
            )
        )
    missing += [f"voxtral lacks {n}" for k, n in dev_by_key.items() if k not in seen]
    if missing:
        raise MergeError(
            f"missing tensors ({len(missing)}): {'; '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
        )
    return items


# ---- execution -------------------------------------------------------------------------------------
def _produce(
    item: Item, tensors: dict[str, torch.Tensor], job: MergeJob, alignment: TokenizerAlignment, summary: Summary
) -> torch.Tensor:
    vox = tensors["vox"]
    if item.kind in ("copy", "skip_shape"):
        if item.kind == "skip_shape":
            log.warning("shape mismatch, kept Voxtral's tensor: %s", item.out_name)
            summary.skipped_shape_mismatch.append(item.out_name)
        return vox
    method = accel.method(job.params.method)
    ctx = TensorContext(item.out_name, item.layer, item.is_mlp)
    base = tensors.get("base") if method.uses_base else None
    if item.kind == "vocab":
        out, stats = merge_vocab_rows(tensors["dev"], vox, base, alignment, method, job.params, ctx, job.min_row_norm)
        summary.special_rows.update({f"{item.out_name}:{k}": v for k, v in stats.items()})
        return out
    return method.merge(tensors["dev"], vox, base, job.params, ctx)


# Inputs of decoder merges are checked through their output: NaN/Inf propagate through linear, SLERP
# and DELLA (0 * NaN is NaN), so a finite output proves finite inputs and only a failure re-checks them.
CHECKED_BY_OUTPUT = ("merge",)
SOURCES = {"vox": ("voxtral", "vox_name"), "dev": ("devstral", "dev_name"), "base": ("base", "base_name")}


def _read_inputs(item: Item, parents: dict[str, Parent], side: ThreadPoolExecutor) -> dict[str, torch.Tensor]:
    """The item's input tensors; each parent's tensor is read (and checksummed) in its own thread."""
    if item.streamed:
        return {}
    keys = ["vox"] + (["dev", "base"] if item.kind in ("merge", "vocab") else [])
    futures = {}
    for key in keys:
        label, attr = SOURCES[key]
        if label in parents and getattr(item, attr):
            check = item.kind not in CHECKED_BY_OUTPUT
            futures[key] = side.submit(parents[label].read, getattr(item, attr), check)
    return {key: fut.result() for key, fut in futures.items()}


def _check_through_output(
    item: Item, inputs: dict[str, torch.Tensor], out: torch.Tensor, parents: dict[str, Parent]
) -> None:
    if item.kind in CHECKED_BY_OUTPUT and not is_finite(out):
        for key, t in inputs.items():
            label, attr = SOURCES[key]
            parents[label].check_input(getattr(item, attr), t)
        raise MergeError(f"{item.out_name}: merged tensor is not finite (overflow) although its inputs are")


def _out_bytes(item: Item) -> int:
    return item.dtype.itemsize * int(torch.Size(item.shape).numel())


def _in_flight_bytes(item: Item) -> int:
    """Inputs read for an item (Voxtral's tensor, plus Devstral's and the base's when merged; none read
    ahead for a row-streamed item)."""
    if item.streamed:
        return 0
    return _out_bytes(item) * (1 if item.kind in ("copy", "skip_shape") else 3)


def _row_blocks(
    item: Item,
    job: MergeJob,
    parents: dict[str, Parent],
    alignment: TokenizerAlignment,
    summary: Summary,
    buffers: BlockBuffers,
) -> Iterator[torch.Tensor]:
    def on_stats(stats: Counter) -> None:
        summary.special_rows.update({f"{item.out_name}:{k}": v for k, v in stats.items()})

    return row_blocks(
        item.out_name,
        (parents["devstral"], item.dev_name),
        (parents["voxtral"], item.vox_name),
        job.params,
        (alignment, job.min_row_norm, on_stats) if item.kind == "vocab" else None,
        buffers,
    )


def _stream(
    queue: list[Item],
    job: MergeJob,
    parents: dict[str, Parent],
    alignment: TokenizerAlignment,
    summary: Summary,
    buffers: BlockBuffers | None = None,
) -> Iterator[tuple[Item, torch.Tensor | Iterator[torch.Tensor]]]:
    """Produced output tensors in order; inputs are read ahead in a thread up to `job.lookahead_bytes`.
    With `buffers` (for the blocks), merged tensors of a streamable merge come as iterators of row blocks."""
    dev, vox = parents["devstral"], parents["voxtral"]
    if buffers is not None and streamable(job.params.method, dev, vox, parents.get("base")):
        queue = [
            dataclasses.replace(it, streamed=True) if it.kind in ("merge", "vocab") and it.shape else it for it in queue
        ]
    bar = tqdm(
        total=sum(_out_bytes(it) for it in queue), unit="B", unit_scale=True, desc="merge", disable=not job.progress
    )
    pending: deque[tuple[Item, Future]] = deque()
    nxt, budget = 0, 0
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(len(parents)) as side:
        while nxt < len(queue) or pending:
            while nxt < len(queue) and (not pending or budget + _in_flight_bytes(queue[nxt]) <= job.lookahead_bytes):
                pending.append((queue[nxt], reader.submit(_read_inputs, queue[nxt], parents, side)))
                budget += _in_flight_bytes(queue[nxt])
                nxt += 1
            item, fut = pending.popleft()
            budget -= _in_flight_bytes(item)
            inputs = fut.result()
            del fut  # drop every reference to the inputs as soon as the output exists (peak memory)
            if item.streamed:
                bar.update(_out_bytes(item))
                yield item, _row_blocks(item, job, parents, alignment, summary, buffers)
                continue
            out = _produce(item, inputs, job, alignment, summary)
            _check_through_output(item, inputs, out, parents)
            del inputs
            if out.dtype != item.dtype or tuple(out.shape) != tuple(item.shape):
                raise MergeError(
                    f"{item.out_name}: produced {out.dtype} {list(out.shape)}, planned {item.dtype} {list(item.shape)}"
                )
            bar.update(_out_bytes(item))
            yield item, out
            del out
    bar.close()


def _plan_id(job: MergeJob, items: list[Item], parents: dict[str, Parent]) -> str:
    """Identity of a merge for resuming: parameters, output table, parents' files (names, sizes, mtimes)."""
    h = hashlib.sha256(json.dumps(job.params.to_dict(), sort_keys=True).encode())
    h.update(f"{job.out_format}|{job.min_row_norm}\n".encode())
    for it in _write_order(items):
        h.update(f"{it.out_name}|{it.kind}|{it.dtype}|{list(it.shape)}\n".encode())
    for label, p in parents.items():
        h.update(f"{label}|{p.path.resolve()}\n".encode())
        for f in sorted(p.path.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def run_merge(job: MergeJob) -> Summary:
    """Merge `job.devstral` and `job.voxtral` into `job.output` (see module docstring)."""
    if job.out_format == "mistral":
        return _merge_to_native(job)
    try:
        job.params.validate()
    except ValueError as exc:
        raise MergeError(str(exc)) from None
    accel.method(job.params.method).prepare()
    paths = [job.devstral, job.voxtral] + ([job.base] if job.base is not None else [])
    naming = detect_naming(paths, job.out_format)
    if naming == "megatron" and job.out_format == "hf":
        raise MergeError("torch_dist parents: use --format megatron (convert the result to HF with tools/convert.py)")
    try:
        dev, vox = open_parent(job.devstral, naming), open_parent(job.voxtral, naming)
        base = open_parent(job.base, naming) if job.base is not None else None
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
    if job.out_format == "hf":  # refused before any tensor is written
        try:
            hf_config_or_refusal(out_cfg)
        except CheckpointError as exc:
            raise MergeError(f"--format hf: {exc}") from None

    final = Path(job.output)
    plan_id = _plan_id(job, items, parents)
    if final.exists():
        done = resolve(final) / PROVENANCE_FILE
        if done.is_file() and json.loads(done.read_text()).get("plan_id") == plan_id:
            _verify_done(final, job.out_format)
            log.info("%s already holds this merge; nothing to do", final)
            return Summary(final, already_complete=True)
        raise MergeError(f"{final} already exists (remove it or choose another --output)")
    summary = Summary(final, tensors=Counter(it.kind for it in items))
    # Only HF shards resume (torch_dist output is one data file); loaders refuse ".partial-" names.
    with atomic_dir(final, resume_key=plan_id if job.out_format == "hf" else None) as tmp:
        try:
            if job.out_format == "hf":
                shards = _write_shards(tmp, items, job, parents, alignment, summary)
            else:
                _write_torch_dist(tmp, items, job, parents, alignment, summary, out_cfg)
            provenance = _provenance(job, plan_id, parents, alignment, rope, summary)
            _write_metadata(tmp, merged_tok, alignment, provenance)
        except ParentError as exc:
            raise MergeError(str(exc)) from None
        if job.out_format == "hf":
            write_hf_files(tmp, out_cfg, merged_tok.get("audio"))
            shards.drop_states()  # until here a rerun resumes every finished shard
            # Every file but merge.json, the index and config.json is recorded (sizes, sha256); the index and
            # config.json make the directory loadable, so they come last and are checked on load instead;
            # config.json takes its name only as the directory is published, after its fsync (`atomic.publish`).
            _record_files(tmp, provenance)
            shards.write_index(_index_metadata(provenance))
            _write_json(tmp / f"config.json{PENDING_SUFFIX}", _hf_config(out_cfg, vox, provenance))
        else:
            _write_megatron_meta(tmp, out_cfg, parents, provenance)
            move_into_release(tmp)  # Megatron-LM's layout: release/ + latest_checkpointed_iteration.txt
    return summary


def _record_files(tmp: Path, provenance: dict) -> None:
    """HF output: merge.json rewritten with the size and sha256 of every other file (what a rerun verifies)."""
    sizes, digests = file_records(tmp, frozenset({PROVENANCE_FILE, LOCK_FILE, RESUME_FILE}))
    _write_json(tmp / PROVENANCE_FILE, provenance | {"files": sizes, "sha256": digests})


def _verify_done(final: Path, out_format: str) -> None:
    """A finished merge counts as done only while its files are all there, unaltered (sizes and sha256)."""
    try:
        if out_format == "hf":
            record = json.loads((final / PROVENANCE_FILE).read_text())
            verify_files(final, record.get("files"), record.get("sha256"), final / PROVENANCE_FILE)
        else:
            read_meta(final)
    except CheckpointError as exc:
        raise MergeError(f"{final} holds a record of this merge, but {exc}; remove it and rerun") from None


def _merge_to_native(job: MergeJob) -> Summary:
    """Mistral-native output: merge into torch_dist beside the output (it holds any rope the merge chooses,
    e.g. Devstral 2's YaRN + llama-4 scaling, which HF Voxtral cannot), then export that with the converter."""
    final = Path(job.output)
    if final.exists():
        raise MergeError(f"{final} already exists (remove it or choose another --output)")
    stage = final.with_name(f".{final.name}.torch_dist")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        summary = run_merge(dataclasses.replace(job, output=stage, out_format="megatron"))
        carry = (resolve(stage) / PROVENANCE_FILE, resolve(stage) / "tokenizer_map.json")
        convert(stage, final, "mistral", progress=job.progress, shard_bytes=job.shard_bytes, carry=carry)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    summary.output = final
    return summary


def _index_metadata(provenance: dict) -> dict[str, Any]:
    """The merge's record in a sharded HF output's index (method, parameters, rope, parents' content hashes)."""
    keys = ("method", "params", "rope_from", "tokenizer_map_sha256")
    parents = {k: v["content_sha256"] for k, v in provenance["parents"].items()}
    return {"tool": "merge", **{k: provenance[k] for k in keys}, "parents_content_sha256": parents}


def _write_shards(
    tmp: Path,
    items: list[Item],
    job: MergeJob,
    parents: dict[str, Parent],
    alignment: TokenizerAlignment,
    summary: Summary,
) -> PlannedShards:
    """HF output: planned, resumable shards (`PlannedShards`); shards an interrupted run finished are kept
    with the input digests and row statistics saved beside them. The caller finishes the returned shards."""
    by_name = {it.out_name: it for it in items}
    specs = [(it.out_name, it.dtype, it.shape) for it in _write_order(items)]
    shards = PlannedShards(tmp, specs, job.shard_bytes or 5 * 1024**3, align=ALIGN, direct=True)
    todo = []
    for fname, shard in shards.shards.items():
        state = shards.finished(fname)
        if state is not None:
            summary.resumed_shards += 1
            _restore_state(state, parents, summary)
        else:
            todo.append((fname, shard))
    queue = [by_name[n] for _, shard in todo for n, _, _ in shard]
    buffers = BlockBuffers()
    # Generators are closed on the way out: an abandoned one would shut its executors and kernel pool down
    # whenever the garbage collector finalizes it, possibly inside another merge's `submit` (a hang).
    stream = _stream(queue, job, parents, alignment, summary, buffers)
    with contextlib.closing(stream), _WriteBehind(job.write_behind_bytes) as writer:
        for fname, shard in todo:
            with shards.write(fname) as f:
                try:
                    for _ in shard:
                        _, out = next(stream)
                        if isinstance(out, torch.Tensor):
                            writer.submit(f, out, buffers.give)
                            continue
                        with contextlib.closing(out):  # its row blocks
                            for piece in out:
                                writer.submit(f, piece, buffers.give)
                    writer.drain()
                except BaseException:
                    writer.abandon()  # no queued write may reach the file once it is closed
                    raise
            shards.commit(fname, _shard_state(shard, by_name, shards.index, fname, parents, summary))
    return shards


def _write_order(items: list[Item]) -> list[Item]:
    """The vocabulary matrices first (their large writes then overlap the decoder's merges instead of
    trailing them), then tensors of whole `ALIGN` runs, then the rest: tensor data starts aligned (the
    header is padded), so every aligned tensor's bytes go to the device without a copy (`DirectWriter`)."""
    return sorted(items, key=lambda it: (it.kind != "vocab", _out_bytes(it) % ALIGN != 0))


class _WriteBehind:
    """Ordered writes in one thread, so merging goes on while large outputs are written. `submit` waits
    only while more than `budget` bytes are queued; a queued piece keeps its tensor alive until written."""

    def __init__(self, budget: int):
        self.budget, self.queued = budget, 0
        self.pending: deque[tuple[Future, int]] = deque()
        self.pool = ThreadPoolExecutor(1)

    def submit(self, f: Any, piece: torch.Tensor, written: Callable[[torch.Tensor], None]) -> None:
        """Queue `piece` for writing to `f`; `written(piece)` is called once it is written."""
        data = tensor_bytes(piece)
        while self.pending and self.queued + data.nbytes > self.budget:
            self._pop()
        fut = self.pool.submit(f.write, data)
        fut.add_done_callback(lambda _: written(piece))
        self.pending.append((fut, data.nbytes))
        self.queued += data.nbytes

    def _pop(self) -> None:
        fut, n = self.pending.popleft()
        fut.result()
        self.queued -= n

    def drain(self) -> None:
        while self.pending:
            self._pop()

    def abandon(self) -> None:
        """Drop the queued writes and wait for the one in progress (its outcome no longer matters)."""
        for fut, _ in self.pending:
            fut.cancel()
        wait([fut for fut, _ in self.pending])
        self.pending.clear()
        self.queued = 0

    def __enter__(self) -> _WriteBehind:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _write_torch_dist(
    tmp: Path,
    items: list[Item],
    job: MergeJob,
    parents: dict[str, Parent],
    alignment: TokenizerAlignment,
    summary: Summary,
    cfg: ModelConfig,
) -> None:
    """Megatron output through the conversion module's streaming torch_dist writer (restarts if killed), with
    Megatron-LM's common state (iteration, checkpoint_version, args) for `cfg`."""
    writer = TorchDistWriter(tmp)
    try:
        with contextlib.closing(_stream(items, job, parents, alignment, summary)) as stream:
            for item, out in stream:
                writer.write(item.out_name, out)
        writer.finish(common_state(cfg, 0))
    except CheckpointError as exc:
        raise MergeError(str(exc)) from None
    finally:
        writer.close()


def _shard_state(
    shard: list,
    by_name: dict[str, Item],
    index: dict[str, str],
    fname: str,
    parents: dict[str, Parent],
    summary: Summary,
) -> dict[str, Any]:
    """What a resumed run needs from a finished shard: input digests, row statistics, skipped tensors."""
    digests: dict[str, dict[str, str]] = {label: {} for label in parents}
    for n, _, _ in shard:
        it = by_name[n]
        sources = {"voxtral": it.vox_name}
        if it.kind in ("merge", "vocab"):
            sources |= {"devstral": it.dev_name, "base": it.base_name}
        for label, src in sources.items():
            if label in parents and src:
                digests[label][src] = parents[label].digests[src]
    return {
        "digests": digests,
        "special_rows": {k: v for k, v in summary.special_rows.items() if index[k.split(":")[0]] == fname},
        "skipped": [n for n in summary.skipped_shape_mismatch if index[n] == fname],
    }


def _restore_state(data: dict[str, Any], parents: dict[str, Parent], summary: Summary) -> None:
    """Input digests and row statistics of a shard finished by an earlier (interrupted) run."""
    for label, p in parents.items():
        p.digests.update(data["digests"].get(label, {}))
    summary.special_rows.update(data["special_rows"])
    summary.skipped_shape_mismatch += data["skipped"]


def _output_config(vox_cfg: ModelConfig, rope: RopeConfig, alignment: TokenizerAlignment) -> ModelConfig:
    decoder = dataclasses.replace(vox_cfg.decoder, rope=rope)
    try:
        audio_id = alignment.merged_rank("[AUDIO]")
    except KeyError:
        raise MergeError("merged tokenizer has no [AUDIO] token") from None
    return dataclasses.replace(vox_cfg, decoder=decoder, audio_token_id=audio_id)


def _provenance(
    job: MergeJob,
    plan_id: str,
    parents: dict[str, Parent],
    alignment: TokenizerAlignment,
    rope: RopeConfig,
    summary: Summary,
) -> dict[str, Any]:
    return {
        "plan_id": plan_id,
        "method": job.params.method,
        "params": job.params.to_dict(),
        "seed": job.params.seed,
        "rope": dataclasses.asdict(rope),
        "rope_from": job.rope_from or "explicit",
        "parents": {
            k: {
                "path": str(p.path),
                "format": p.format,
                "content_sha256": p.content_hash(),
                **published_record(p.source.dropped, p.source.activation_scales),
            }
            for k, p in parents.items()
        },
        "tokenizer_map_sha256": alignment.sha256(),
        "min_row_norm": job.min_row_norm,
        "tensors": dict(summary.tensors),
        "special_rows": dict(summary.special_rows),
        "skipped_shape_mismatch": summary.skipped_shape_mismatch,
        "hash_note": "content_sha256 = sha256(config, tekken.json, tensor table with per-tensor XXH3-128)",
    }


def _write_metadata(tmp: Path, merged_tok: dict, alignment: TokenizerAlignment, provenance: dict) -> None:
    """Tokenizer, map and provenance for every format (an HF output's config.json comes last: `_hf_config`)."""
    write_tekken(merged_tok, tmp / TOKENIZER_FILE)
    (tmp / "tokenizer_map.json").write_text(alignment.model_dump_json(indent=2) + "\n")
    _write_json(tmp / PROVENANCE_FILE, provenance)


def _hf_config(cfg: ModelConfig, vox: Parent, provenance: dict) -> dict:
    """config.json of an HF output (rope_parameters, the parents' decoder dtype, the merge's record)."""
    hf = cfg.to_hf()  # checked before the tensors were written
    hf["dtype"] = str(vox.dtype(next(n for n in vox.names if classify(n).role == "decoder"))).removeprefix("torch.")
    hf["merge"] = {k: provenance[k] for k in ("method", "params", "rope_from", "tokenizer_map_sha256")}
    return hf


def _write_megatron_meta(tmp: Path, cfg: ModelConfig, parents: dict[str, Parent], provenance: dict) -> None:
    """checkpoint_meta.json (ModelConfig with rope, tokenizer hash, sources, merge record), written last."""
    sources = [
        {"path": str(p.path), "role": k, "content_sha256": provenance["parents"][k]["content_sha256"]}
        for k, p in parents.items()
    ]
    meta = CheckpointMeta(
        model=cfg,
        tokenizer_sha256=sha256_file(tmp / TOKENIZER_FILE),
        sources=sources,
        command=command_line(),
        tool="merge",
        extra={"merge": provenance},
    )
    write_meta(tmp, meta)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
