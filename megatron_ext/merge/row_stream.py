"""Linear merges streamed in row blocks (HF parents and output): every decoder tensor, the embedding and
the LM head.

Merged whole, a tensor is read, merged into fresh memory and written with no overlap, and reading
ahead of a multi-GB matrix would break the memory budget. Streamed, a pool of one thread per core maps
and merges the next blocks (single-threaded kernels, so no per-kernel fork/join competes with the I/O
threads) while earlier ones are digested in order and written; nothing large is allocated, so resident
memory stays at a few blocks. For the
vocabulary matrices the special-token rows (the head of the matrix, tokenizer-aware rules in
`embeddings.py`) are merged first. Linear is elementwise, so blocks give the same bits as the whole
tensor; input digests run over the blocks in order and equal the whole-tensor XXH3-128, and NaN/Inf,
which propagate through linear, are looked for in the merged blocks (inputs are checked only then),
except in the vocabulary head, whose inputs are checked directly: some of their rows are not used.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import xxhash

from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.merge.embeddings import merge_vocab_rows
from megatron_ext.merge.methods import METHODS, MergeParams, TensorContext
from megatron_ext.merge.parents import HFParent, ParentError, check_finite, is_finite
from megatron_ext.merge.safetensors_io import read_tensor
from megatron_ext.tokenizer.align import TokenizerAlignment

BLOCK_BYTES = 8 * 1024**2  # per input block: a block of both inputs stays in L3 from digest to merge


def streamable(method: str, dev: object, vox: object, base: object | None) -> bool:
    """Row streaming covers linear merges of two HF (safetensors) parents."""
    return method == "linear" and base is None and isinstance(dev, HFParent) and isinstance(vox, HFParent)


def _read(parent: HFParent, name: str, rows: tuple[int, int]) -> torch.Tensor:
    try:
        return read_tensor(parent.entries[name], rows)
    except CheckpointError as exc:
        raise ParentError(str(exc)) from None


def _merge_block(
    dev: tuple[HFParent, str], vox: tuple[HFParent, str], rows: tuple[int, int], params: MergeParams, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map one row range of both inputs and merge it into fresh memory (a task of the block pool)."""
    d, v = _read(*dev, rows), _read(*vox, rows)
    out = METHODS["linear"].merge(d, v, None, params, TensorContext(name))
    _check(out, ((dev, d), (vox, v)), name)
    return d, v, out


def linear_row_blocks(
    name: str,
    dev: tuple[HFParent, str],
    vox: tuple[HFParent, str],
    params: MergeParams,
    vocab: tuple[TokenizerAlignment, float, Callable[[Counter], None]] | None = None,
) -> Iterator[torch.Tensor]:
    """The merged tensor (at least 1-D) as consecutive row blocks. `vocab` = (alignment, min_row_norm,
    on_stats) for the embedding and LM head."""
    shape, dtype = dev[0].shape(dev[1]), dev[0].dtype(dev[1])
    rows = shape[0]
    row_bytes = dtype.itemsize * int(torch.Size(shape[1:]).numel())
    block_rows = max(1, BLOCK_BYTES // max(1, row_bytes))
    digests = [xxhash.xxh3_128() for _ in range(2)]
    head_rows = 0
    if vocab is not None:
        # The special rows plus every Voxtral row a special is copied from, merged by the whole-matrix rules.
        alignment, min_row_norm, on_stats = vocab
        head_rows = min(rows, max([alignment.num_special_tokens, *(r + 1 for r in alignment.voxtral_to_merged)]))
        d, v = _read(*dev, (0, head_rows)), _read(*vox, (0, head_rows))
        for (parent, tensor), t in ((dev, d), (vox, v)):  # some of these rows never reach the output
            check_finite(t, f"{parent.path}: tensor {tensor}")
        ctx = TensorContext(name)
        out, stats = merge_vocab_rows(d, v, None, alignment, METHODS["linear"], params, ctx, min_row_norm)
        _check(out, ((dev, d), (vox, v)), name)
        for h, t in zip(digests, (d, v), strict=True):
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        on_stats(stats)
        yield out
    ranges = [(a, min(a + block_rows, rows)) for a in range(head_rows, rows, block_rows)]
    workers = threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over blocks instead: no per-kernel fork/join next to the I/O threads
    try:
        with ThreadPoolExecutor(workers) as pool:
            pending = deque(pool.submit(_merge_block, dev, vox, r, params, name) for r in ranges[: 2 * workers])
            for k in range(len(ranges)):
                d, v, out = pending.popleft().result()
                if k + 2 * workers < len(ranges):
                    pending.append(pool.submit(_merge_block, dev, vox, ranges[k + 2 * workers], params, name))
                for h, t in zip(digests, (d, v), strict=True):  # in order: equals the whole-tensor digest
                    h.update(t.reshape(-1).view(torch.uint8).numpy())
                del d, v
                yield out
    finally:
        torch.set_num_threads(threads)
    for (parent, tensor), h in zip((dev, vox), digests, strict=True):
        parent.digests[tensor] = h.hexdigest()


def _check(out: torch.Tensor, inputs: tuple, name: str) -> None:
    """A merged block is finite, or the error names the input tensor holding NaN/Inf (or says overflow)."""
    if is_finite(out):
        return
    for (parent, tensor), t in inputs:
        check_finite(t, f"{parent.path}: tensor {tensor}")
    raise ParentError(f"{name}: merged rows are not finite (overflow) although the inputs are")
