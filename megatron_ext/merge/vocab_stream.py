"""Linear merge of the embedding / LM head streamed in row blocks (HF parents and output only).

These two matrices are most of a model's bytes; merged whole, each is read, merged and written with no
overlap (reading ahead of a multi-GB tensor would break the memory budget). Streamed, the special-token
rows (the head of the matrix, tokenizer-aware rules in `embeddings.py`) are merged first, then the
shared vocabulary in fixed blocks: the next block is read (positioned reads into reused buffers) while
this one is merged and the previous one written. Linear is elementwise, so blocks give the same bits
as the whole tensor; input checksums run over the blocks in order and equal the whole-tensor CRC32.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from megatron_ext.merge.embeddings import merge_vocab_rows
from megatron_ext.merge.methods import METHODS, MergeParams, TensorContext
from megatron_ext.merge.parents import HFParent, check_finite
from megatron_ext.merge.safetensors_io import read_into
from megatron_ext.tokenizer.align import TokenizerAlignment

BLOCK_BYTES = 32 * 1024**2  # per input block; 2 inputs x 2 buffers + 2 output buffers in flight


def streamable(method: str, dev: object, vox: object, base: object | None) -> bool:
    """Row streaming covers linear merges of two HF (safetensors) parents."""
    return method == "linear" and base is None and isinstance(dev, HFParent) and isinstance(vox, HFParent)


class _Source:
    """One parent's matrix read block by block into two reused buffers, checked and checksummed in order."""

    def __init__(self, parent: HFParent, name: str, row_bytes: int, block_rows: int):
        self.parent, self.name, self.entry = parent, name, parent.entries[name]
        self.row_bytes = row_bytes
        self.bufs = [torch.empty(block_rows * row_bytes, dtype=torch.uint8) for _ in range(2)]
        self.crc = 0

    def read(self, start: int, stop: int, shape: tuple[int, ...], slot: int | None = None) -> torch.Tensor:
        """Rows start..stop-1 into buffer `slot` (a fresh buffer when None), checksummed and checked finite."""
        size = (stop - start) * self.row_bytes
        buf = torch.empty(size, dtype=torch.uint8) if slot is None else self.bufs[slot][:size]
        read_into(self.entry, start * self.row_bytes, buf)
        self.crc = zlib.crc32(buf.numpy(), self.crc)
        t = buf.view(self.entry.dtype).reshape(stop - start, *shape[1:])
        check_finite(t, f"{self.parent.path}: tensor {self.name}")
        return t


def linear_vocab_blocks(
    name: str,
    dev: tuple[HFParent, str],
    vox: tuple[HFParent, str],
    alignment: TokenizerAlignment,
    params: MergeParams,
    min_row_norm: float,
    on_stats: Callable[[Counter], None],
) -> Iterator[torch.Tensor]:
    """The merged matrix as consecutive row blocks (each valid until the next-but-one is produced)."""
    shape = dev[0].shape(dev[1])
    rows, dtype = shape[0], dev[0].dtype(dev[1])
    row_bytes = dtype.itemsize * (int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1)
    block_rows = max(1, BLOCK_BYTES // max(1, row_bytes))
    srcs = [_Source(p, n, row_bytes, block_rows) for p, n in (dev, vox)]
    # Head: the special rows plus every Voxtral row a special is copied from, merged by the whole-matrix rules.
    head_rows = min(rows, max([alignment.num_special_tokens, *(r + 1 for r in alignment.voxtral_to_merged)]))
    d_head, v_head = (s.read(0, head_rows, shape) for s in srcs)
    ctx = TensorContext(name)
    out, stats = merge_vocab_rows(d_head, v_head, None, alignment, METHODS["linear"], params, ctx, min_row_norm)
    on_stats(stats)
    yield out
    del out, d_head, v_head
    starts = list(range(head_rows, rows, block_rows))
    outs = [torch.empty(block_rows * row_bytes, dtype=torch.uint8) for _ in range(2)]

    def fetch(k: int) -> list:
        a, b = starts[k], min(starts[k] + block_rows, rows)
        return [side.submit(s.read, a, b, shape, k % 2) for s in srcs]

    with ThreadPoolExecutor(len(srcs)) as side:  # own readers: not queued behind other tensors' reads
        pending = fetch(0) if starts else []
        for k in range(len(starts)):
            d, v = (f.result() for f in pending)
            if k + 1 < len(starts):
                pending = fetch(k + 1)
            dst = outs[k % 2][: d.numel() * dtype.itemsize].view(dtype).reshape(d.shape)
            yield METHODS["linear"].merge(d, v, None, params, ctx, out=dst)
    for s in srcs:
        s.parent.crc[s.name] = s.crc
