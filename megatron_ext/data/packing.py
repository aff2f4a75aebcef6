"""Sequence packing: whole documents side by side in `seq_length` tokens, with per-document attention.

Each document contributes `tokens[:-1]` as inputs and `tokens[1:]` as labels (so no label ever crosses a
document boundary), position ids restarting at 0, and its loss mask shifted the same way. The tail is padding,
a document of its own with loss mask 0. Document lengths give `cu_seqlens` (Megatron's packed THD format, used
by Transformer Engine) and, for the local CPU spec, an explicit block-diagonal causal mask. Under context
parallelism (`doc_multiple` = 2 x cp) each document is followed by padding up to a multiple of `doc_multiple`
positions (loss mask 0), so Megatron-Core can cut every document into 2 x cp equal slices
(`cu_seqlens_padded`; `cu_seqlens` keeps the real lengths). The packer's position is its feed's (mixture)
position plus the document waiting for the next sequence. Documents come from a feed (`feed.py`): encoded in
this process, or ahead of time in workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from megatron_ext.data.chat import ChatEncoder, EncodedDoc
from megatron_ext.data.feed import InlineFeed
from megatron_ext.data.mixture import DocRef, Mixture


@dataclass
class PackedSequence:
    """One row of a micro-batch: `seq_length` positions holding whole documents plus padding."""

    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    source_ids: np.ndarray  # source index per position, -1 on padding
    doc_lens: list[int]  # lengths of the documents in order, padding last (sums to seq_length)
    audio_chunks: list[np.ndarray] = field(default_factory=list)
    mels: list[np.ndarray] = field(default_factory=list)  # log-mel chunks computed at encoding, in audio order
    padded_lens: list[int] = field(default_factory=list)  # positions per document with its CP padding; [] = doc_lens


def padded_length(n: int, doc_multiple: int) -> int:
    """Positions a document of `n` input tokens occupies: `n` rounded up to a multiple of `doc_multiple`."""
    return -(-n // doc_multiple) * doc_multiple


def pack(
    docs: list[EncodedDoc], source_ids: list[int], seq_length: int, pad_id: int, doc_multiple: int = 1
) -> PackedSequence:
    """Pack already-fitting documents (each `len(doc) - 1 <= seq_length` in total) into one sequence, each
    padded to a multiple of `doc_multiple` positions."""
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    position_ids = np.zeros(seq_length, dtype=np.int64)
    sources = np.full(seq_length, -1, dtype=np.int64)
    doc_lens, padded, chunks, mels, pos = [], [], [], [], 0
    for doc, src in zip(docs, source_ids, strict=True):
        n = len(doc) - 1
        slot = padded_length(n, doc_multiple)
        if pos + slot > seq_length:
            raise ValueError(f"documents need {pos + slot} positions, seq_length is {seq_length}")
        tokens[pos : pos + n] = doc.tokens[:-1]
        labels[pos : pos + n] = doc.tokens[1:]
        loss_mask[pos : pos + n] = doc.loss_mask[1:]
        position_ids[pos : pos + n] = np.arange(n)
        sources[pos : pos + n] = src
        position_ids[pos + n : pos + slot] = np.arange(n, slot)
        doc_lens.append(n)
        padded.append(slot)
        chunks.extend(doc.audio_chunks)
        mels.extend(doc.mels)
        pos += slot
    if pos < seq_length:
        doc_lens.append(seq_length - pos)
        padded.append(seq_length - pos)
    return PackedSequence(
        tokens, labels, loss_mask, position_ids, sources, doc_lens, chunks, mels, padded if doc_multiple > 1 else []
    )


class Packer:
    """Draws documents from a mixture, encodes them (or takes them encoded from `feed`) and packs them greedily
    in arrival order."""

    def __init__(
        self,
        mixture: Mixture,
        encoder: ChatEncoder,
        seq_length: int,
        pad_id: int,
        overlong: str = "truncate",
        feed: InlineFeed | None = None,
        doc_multiple: int = 1,
    ) -> None:
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong={overlong!r}: expected 'truncate' or 'drop'")
        self.mixture, self.encoder = mixture, encoder
        self.feed = feed or InlineFeed(mixture, self._encode_ref)
        self.seq_length, self.pad_id, self.overlong = seq_length, pad_id, overlong
        self.doc_multiple = doc_multiple
        self.carry: DocRef | None = None  # drawn but did not fit into the previous sequence
        self._carry_doc: EncodedDoc | None = None
        self.dropped = 0
        self._max_drop_streak = sum(len(s) for s in mixture.sources)

    def _fit(self, doc: EncodedDoc) -> EncodedDoc | None:
        """The document cut to seq_length + 1 tokens, or None when it cannot be trained on."""
        limit = self.seq_length + 1
        if len(doc) <= limit:
            return doc
        if self.overlong == "drop":
            return None
        has_audio = doc.audio_chunks or doc.mels
        audio_positions = np.flatnonzero(doc.tokens == self.encoder.audio_token_id) if has_audio else []
        if len(audio_positions) and audio_positions[-1] >= limit - 1:
            return None  # the cut would split an audio chunk's embeddings
        cut = dataclasses.replace(doc, tokens=doc.tokens[:limit], loss_mask=doc.loss_mask[:limit])
        return cut if cut.loss_mask[1:].any() else None

    def _encode_ref(self, ref: DocRef) -> EncodedDoc:
        source = self.mixture.sources[ref.source]
        return self.encoder.encode(source[ref.index], source.name, source.where(ref.index))

    def __iter__(self) -> Packer:
        return self

    def __next__(self) -> PackedSequence:
        docs: list[EncodedDoc] = []
        refs: list[DocRef] = []
        used = streak = 0
        while True:
            if self.carry is not None:
                ref, doc = self.carry, self._carry_doc
                self.carry = self._carry_doc = None
            else:
                try:
                    ref, doc = next(self.feed)
                except StopIteration:
                    if docs:
                        break
                    raise
                doc = self._fit(doc)
            if doc is None:
                self.dropped += 1
                streak += 1
                if streak > self._max_drop_streak:
                    raise ValueError(
                        f"{streak} documents in a row do not fit seq_length={self.seq_length} "
                        f"(overlong={self.overlong!r}); raise training.seq_length"
                    )
                continue
            streak = 0
            positions = padded_length(len(doc) - 1, self.doc_multiple)
            if docs and used + positions > self.seq_length:
                self.carry, self._carry_doc = ref, doc
                break
            docs.append(doc)
            refs.append(ref)
            used += positions
        return pack(docs, [r.source for r in refs], self.seq_length, self.pad_id, self.doc_multiple)

    def state_dict(self) -> dict[str, Any]:
        carry = None if self.carry is None else [self.carry.source, self.carry.index]
        return {"mixture": self.feed.state_dict(), "carry": carry, "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.feed.load_state_dict(state["mixture"])
        self.carry = None if state["carry"] is None else DocRef(*state["carry"])
        self._carry_doc = None if self.carry is None else self._fit(self.feed.encode(self.carry))
        self.dropped = state["dropped"]


def collate(rows: list[PackedSequence], mel: Callable[[np.ndarray], torch.Tensor] | None) -> dict[str, Any]:
    """Stack packed rows into a micro-batch: [b, s] tensors, cu_seqlens over the flattened rows (real lengths,
    and `cu_seqlens_padded` with the CP padding), mels (those computed at encoding, else `mel` of each raw audio
    chunk)."""
    stack = lambda key, dtype: torch.from_numpy(np.stack([getattr(r, key) for r in rows])).to(dtype)  # noqa: E731
    seq_length = len(rows[0].tokens)
    lens = [n for r in rows for n in r.doc_lens]
    slots = [n for r in rows for n in (r.padded_lens or r.doc_lens)]
    cu, cu_padded = (torch.zeros(len(lens) + 1, dtype=torch.int32) for _ in range(2))
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    cu_padded[1:] = torch.cumsum(torch.tensor(slots, dtype=torch.int32), 0)
    doc_ids = torch.stack(
        [
            torch.repeat_interleave(torch.arange(len(r.doc_lens)), torch.tensor(r.padded_lens or r.doc_lens))
            for r in rows
        ]
    )
    chunks = [c for r in rows for c in r.audio_chunks]
    mels = [torch.from_numpy(m) for r in rows for m in r.mels] or ([mel(c) for c in chunks] if mel is not None else [])
    return {
        "tokens": stack("tokens", torch.long),
        "labels": stack("labels", torch.long),
        "loss_mask": stack("loss_mask", torch.float32),
        "position_ids": stack("position_ids", torch.long),
        "source_ids": stack("source_ids", torch.long),
        "doc_ids": doc_ids,
        "cu_seqlens": cu,
        "cu_seqlens_padded": cu_padded,
        "max_seqlen": max(slots),
        "doc_lengths": [n for r in rows for n in (r.doc_lens[:-1] if _ends_in_padding(r) else r.doc_lens)],
        "mel": torch.stack(mels) if mels else None,
        "num_audio_chunks": len(chunks) + sum(len(r.mels) for r in rows),
        "seq_length": seq_length,
    }


def _ends_in_padding(row: PackedSequence) -> bool:
    """Whether the row's last entry is the padding tail (its first position has no source), not a document."""
    return bool(row.source_ids[len(row.tokens) - (row.padded_lens or row.doc_lens)[-1]] < 0)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True = masked: a position sees only earlier positions of its own document.

    For the local (non-TE) attention, which takes an explicit mask; its size is s^2 per row, so this is
    for CPU and short sequences only (the TE path uses cu_seqlens instead).
    """
    s = doc_ids.shape[1]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return ~(same_doc & causal)[:, None]
