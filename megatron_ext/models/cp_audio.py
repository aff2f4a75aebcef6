"""Context parallelism with audio: the tokens a CP rank holds and the 30 s chunks it must encode for them.

Megatron-Core's load-balanced order for packed (THD) sequences, as Transformer Engine's
`thd_get_partitioned_indices` computes it: every document is padded to a multiple of 2 x cp positions
(`cu_seqlens_padded`) and cut into 2 x cp equal slices; CP rank r holds slices r and 2 x cp - 1 - r of each
document, documents in order. Whisper never attends across chunks, so CP for the encoder is chunk
parallelism: a rank encodes only the chunks that own one of its [AUDIO] positions (a chunk straddling a slice
boundary is encoded by every rank holding part of it) and keeps the embeddings of its own positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ext.errors import ProjectError


class ContextParallelLayoutError(ProjectError, ValueError):
    """A packed sequence cannot be split for context parallelism (a document not a multiple of 2 x cp)."""


def partition_index(cu_seqlens_padded: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Positions of the packed stream that CP rank `rank` holds, in its local order (int64, on the input's device)."""
    bounds = [int(b) for b in cu_seqlens_padded.tolist()]
    parts = []
    for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if (end - start) % (2 * cp):
            raise ContextParallelLayoutError(
                f"document {doc} spans {end - start} positions: context_parallel_size={cp} needs a multiple of "
                f"2 x cp = {2 * cp} (pad documents with data's doc_multiple)"
            )
        size = (end - start) // (2 * cp)
        for part in (rank, 2 * cp - 1 - rank):
            parts.append(torch.arange(start + part * size, start + (part + 1) * size))
    index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return index.to(cu_seqlens_padded.device)


@dataclass(frozen=True)
class LocalAudio:
    """What one CP rank encodes: `chunks` (ascending indices into the batch's chunks) and, for each of its
    [AUDIO] positions in local order, `rows`: the row of that position's embedding in encode(chunks)."""

    chunks: torch.Tensor
    rows: torch.Tensor


def local_audio(input_ids: torch.Tensor, index: torch.Tensor, audio_token_id: int, per_chunk: int) -> LocalAudio:
    """The chunks whose [AUDIO] positions fall on `index` of the flat stream `input_ids` ([1, s] or [s]).

    The k-th [AUDIO] token of the stream is embedding k % per_chunk of chunk k // per_chunk (the order
    `splice_audio` fills them in at CP=1)."""
    is_audio = input_ids.reshape(-1) == audio_token_id
    ordinal = torch.cumsum(is_audio, 0) - 1  # k for the k-th [AUDIO] token
    mine = ordinal[index][is_audio[index]]
    chunk_of = torch.div(mine, per_chunk, rounding_mode="floor")
    chunks = torch.unique(chunk_of)  # sorted
    rows = torch.searchsorted(chunks, chunk_of) * per_chunk + mine % per_chunk
    return LocalAudio(chunks, rows)
