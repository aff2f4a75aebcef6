"""Elementwise merges (linear, SLERP) streamed in row blocks (HF parents and output): every decoder tensor,
the embedding and the LM head.

Merged whole, a tensor is merged into fresh memory and written with no overlap, and reading ahead of a
multi-GB matrix would break the memory budget. Streamed, a `KernelPool` (one thread per core, single-
threaded kernels) merges the next blocks while earlier ones are written; nothing large is allocated.
Linear maps each block of both inputs from the files as it goes; SLERP maps the whole tensors once, since
its coefficients come from the whole (the accelerated methods' `rows`: chunk tasks in the same pool),
then applies them block by block, hashing the inputs meanwhile (the coefficient passes are CPU-bound, the
block writes are not: hashed alongside the coefficients, SLERP took 0.2 s longer). For the vocabulary
matrices the special-token rows (the head of the matrix, tokenizer-aware rules in `embeddings.py`) come
first, their inputs checked directly since some of their rows are not used. Blocks are whole 4 KiB runs
where the row size allows (boundaries at multiples of the block size, so the stream re-aligns after the
head), which the direct writer sends to the device from the block's own buffer. Blocks give the bits of
the whole-tensor merge; input digests run over the tensor in order and equal the whole-tensor XXH3-128;
NaN/Inf, which propagate through both methods, are looked for in the merged blocks (the inputs are
checked only then, to name the tensor).
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator

import torch
import xxhash

from megatron_ext.checkpoint.direct_io import ALIGN, aligned_empty
from megatron_ext.merge import accel
from megatron_ext.merge.accel import KernelPool
from megatron_ext.merge.embeddings import merge_vocab_rows
from megatron_ext.merge.methods import MergeParams, RowMerge, TensorContext
from megatron_ext.merge.parents import HFParent, ParentError, check_finite, is_finite
from megatron_ext.tokenizer.align import TokenizerAlignment

BLOCK_BYTES = 8 * 1024**2  # per input block: a block of both inputs stays in L3 from mapping to merge
Source = tuple[HFParent, str]


def streamable(method: str, dev: object, vox: object, base: object | None) -> bool:
    """Row streaming covers linear and SLERP merges of two HF (safetensors) parents, with accelerations on
    (the blocks are merged in a `KernelPool` by the accelerated methods' `rows`)."""
    return (
        accel.enabled()
        and method in ("linear", "slerp")
        and base is None
        and isinstance(dev, HFParent)
        and isinstance(vox, HFParent)
    )


class BlockBuffers:
    """Output memory for row blocks, recycled: the writer gives each block back once written (`give`).
    Fresh memory per block costs page faults (about 2 s of a 3.5 GB merge here), and freed 8 MiB heap
    chunks churning through the write-behind queue left the process holding memory that grew with the
    model. Buffers start on `ALIGN` boundaries, so the writer sends them to the device without a copy.
    Thread-safe; tensors it did not hand out are ignored by `give`."""

    def __init__(self, capacity: int = BLOCK_BYTES):
        self.capacity = capacity
        self._free: list[torch.Tensor] = []
        self._owned: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = dtype.itemsize * shape.numel()
        if nbytes > self.capacity:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None:
            buf = aligned_empty(self.capacity)
            with self._lock:
                self._owned[buf.untyped_storage().data_ptr()] = buf
        return buf[:nbytes].view(dtype).view(shape)

    def give(self, block: torch.Tensor) -> None:
        with self._lock:
            buf = self._owned.get(block.untyped_storage().data_ptr())
            if buf is not None:
                self._free.append(buf)


def _merge_block(
    merge: RowMerge,
    srcs: tuple[Source, Source],
    inputs: tuple[torch.Tensor, torch.Tensor] | None,
    rows: tuple[int, int],
    name: str,
    buffers: BlockBuffers | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row range of both inputs (mapped now unless given) merged into an output buffer (a pool task)."""
    d, v = (p.read_rows(n, rows) for p, n in srcs) if inputs is None else (t[rows[0] : rows[1]] for t in inputs)
    out = merge(d, v, buffers.take(d.shape, d.dtype) if buffers is not None else torch.empty_like(d))
    _check(out, srcs, (d, v) if inputs is None else inputs, name)  # whole-tensor state: any row may be at fault
    return d, v, out


def row_blocks(
    name: str,
    dev: Source,
    vox: Source,
    params: MergeParams,
    vocab: tuple[TokenizerAlignment, float, Callable[[Counter], None]] | None = None,
    buffers: BlockBuffers | None = None,
) -> Iterator[torch.Tensor]:
    """The merged tensor (at least 1-D) as consecutive row blocks. `vocab` = (alignment, min_row_norm,
    on_stats) for the embedding and LM head; blocks are taken from `buffers` when given."""
    method, srcs = accel.method(params.method), (dev, vox)
    shape, dtype = dev[0].shape(dev[1]), dev[0].dtype(dev[1])
    rows = shape[0]
    row_bytes = dtype.itemsize * int(torch.Size(shape[1:]).numel())
    block_rows = _block_rows(row_bytes)
    digests = [xxhash.xxh3_128() for _ in srcs]
    regular_start = vocab[0].num_special_tokens if vocab is not None else 0
    with KernelPool() as pool:
        whole, hashed = None, None
        if method.rows_need_whole:
            whole = tuple(pool.map(lambda src: src[0].read_rows(src[1]), srcs))
            merge = method.rows(params, *(t[regular_start:] for t in whole), pool=pool)
            hashed = pool.submit(_digest, digests, whole)  # runs while the first blocks are merged and written
        else:
            merge = method.rows(params)
        head_rows = 0
        if vocab is not None:
            # The special rows plus every Voxtral row a special is copied from, merged by the whole-matrix rules.
            alignment, min_row_norm, on_stats = vocab
            head_rows = min(rows, max([alignment.num_special_tokens, *(r + 1 for r in alignment.voxtral_to_merged)]))
            head = (0, head_rows)
            d, v = (p.read_rows(n, head) for p, n in srcs) if whole is None else (t[:head_rows] for t in whole)
            _check_inputs(srcs, (d, v))  # some of these rows never reach the output
            ctx = TensorContext(name)
            out, stats = merge_vocab_rows(d, v, None, alignment, method, params, ctx, min_row_norm, regular=merge)
            _check(out, srcs, (d, v) if whole is None else whole, name)
            if whole is None:
                _digest(digests, (d, v))
            on_stats(stats)
            yield out
        # Block boundaries at multiples of block_rows: after the head, the blocks are whole ALIGN runs again.
        first_whole = (head_rows // block_rows + 1) * block_rows
        starts = [head_rows, *range(first_whole, rows, block_rows)] if rows > head_rows else []
        ranges = list(zip(starts, [*starts[1:], rows], strict=True))
        ahead = 2 * pool.threads
        pending = deque(pool.submit(_merge_block, merge, srcs, whole, r, name, buffers) for r in ranges[:ahead])
        for k in range(len(ranges)):
            d, v, out = pending.popleft().result()
            if k + ahead < len(ranges):
                pending.append(pool.submit(_merge_block, merge, srcs, whole, ranges[k + ahead], name, buffers))
            if whole is None:  # in order: equals the whole-tensor digest
                _digest(digests, (d, v))
            del d, v
            yield out
        if hashed is not None:
            hashed.result()
    for (parent, tensor), h in zip(srcs, digests, strict=True):
        parent.digests[tensor] = h.hexdigest()


def _block_rows(row_bytes: int) -> int:
    """Rows per block: about BLOCK_BYTES, a multiple of ALIGN bytes where a block holds enough rows."""
    rows = max(1, BLOCK_BYTES // max(1, row_bytes))
    per_run = ALIGN // math.gcd(row_bytes, ALIGN) if row_bytes else 1
    return rows - rows % per_run if rows >= per_run else rows


def _check(out: torch.Tensor, srcs: tuple[Source, Source], inputs: tuple[torch.Tensor, ...], name: str) -> None:
    """A merged block is finite, or the error names the input tensor holding NaN/Inf (or says overflow)."""
    if is_finite(out):
        return
    _check_inputs(srcs, inputs)
    raise ParentError(f"{name}: merged rows are not finite (overflow) although the inputs are")


def _check_inputs(srcs: tuple[Source, Source], inputs: tuple[torch.Tensor, ...]) -> None:
    for (parent, tensor), t in zip(srcs, inputs, strict=True):
        check_finite(t, f"{parent.path}: tensor {tensor}")


def _digest(digests: list, tensors: tuple[torch.Tensor, ...]) -> None:
    """Feed each input's bytes to its running digest."""
    for h, t in zip(digests, tensors, strict=True):
        h.update(t.reshape(-1).view(torch.uint8).numpy())
