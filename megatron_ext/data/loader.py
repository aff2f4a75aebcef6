"""Step-wise micro-batches for one data-parallel rank, built from the config's sources.

Sequence j of every step comes from stream j (`streams.py`; one stream per sequence of the global batch),
and sequence j goes to DP rank j % dp, as Megatron deals a global batch. A rank therefore reads, encodes
and packs only its own sequences; tensor- and context-parallel peers of a rank build the same sequences
deterministically (no broadcast on the data path). With `data.num_workers` > 0 the encoding (chat template,
audio decode, log-mel) runs in a pool of worker processes, `data.prefetch` documents ahead per stream,
while the model trains; packing stays here and takes documents in draw order, so the sequences are the same
for any number of workers. The data position is the list of every stream's position (gathered from the
DP ranks when saved): the same on all ranks, and valid for any DP size on resume.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import torch.distributed as dist

from megatron_ext.data.chat import ChatEncoder
from megatron_ext.data.feed import DocEncoder, InlineFeed, Mel, PoolFeed, start_pool
from megatron_ext.data.mixture import Mixture
from megatron_ext.data.packing import PackedSequence, Packer, collate
from megatron_ext.data.sources import DataSourceError, open_source
from megatron_ext.data.streams import SourceShard, stream_ratios, stream_seed, stream_shards

PAD_ID = 11  # Tekken <pad>


def _open_streams(
    specs: list[tuple[str, str, str]], num_streams: int, streams: list[int]
) -> dict[int, list[SourceShard]]:
    """The listed streams' shares of the sources (path, format, name), opened in this process."""
    return stream_shards([open_source(*spec) for spec in specs], num_streams, streams)


def _worker_encoder(
    specs: list[tuple[str, str, str]], num_streams: int, streams: list[int], encoder: ChatEncoder, mel: Mel | None
) -> DocEncoder:
    """A worker's document encoder over its own freshly opened sources."""
    return DocEncoder(_open_streams(specs, num_streams, streams), encoder, mel)


class SFTData:
    """Training streams (mixture -> packer, per sequence) and a fixed validation set, for one DP rank; documents
    padded to a multiple of `doc_multiple` positions (2 x cp under context parallelism)."""

    def __init__(
        self,
        data_cfg: Any,
        seq_length: int,
        seed: int,
        encoder: ChatEncoder,
        mel: Mel | None,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_streams: int | None = None,
        group: Any = None,
        doc_multiple: int = 1,
    ) -> None:
        self.encoder, self.mel, self.doc_multiple = encoder, mel, doc_multiple
        self.seq_length, self.dp_rank, self.dp_size, self.group = seq_length, dp_rank, dp_size, group
        self.num_streams = num_streams or dp_size
        if self.num_streams % dp_size:
            raise ValueError(f"{self.num_streams} sequences per step do not split over {dp_size} DP ranks")
        self.streams = list(range(dp_rank, self.num_streams, dp_size))  # this rank's sequences, in step order
        self.source_names = [s.name for s in data_cfg.sources]
        self.source_modality = [s.modality for s in data_cfg.sources]
        specs = [(s.path, s.format, s.name) for s in data_cfg.sources]
        shards = _open_streams(specs, self.num_streams, self.streams)
        local = DocEncoder(shards, encoder, mel)
        self.pool = None
        if data_cfg.num_workers > 0:
            build = partial(_worker_encoder, specs, self.num_streams, self.streams, encoder, mel)
            self.pool = start_pool(data_cfg.num_workers, build)
            weakref.finalize(self, self.pool.shutdown, wait=False, cancel_futures=True)
        self.packers: dict[int, Packer] = {}
        for j in self.streams:
            mixture = Mixture(
                shards[j],
                stream_ratios(shards[j], [s.ratio for s in data_cfg.sources]),
                [s.epochs for s in data_cfg.sources],
                seed=stream_seed(seed, j),
                shuffle_buffer=data_cfg.shuffle_buffer,
            )
            encode = local.for_stream(j)
            feed = (
                InlineFeed(mixture, encode)
                if self.pool is None
                else PoolFeed(mixture, encode, self.pool, j, data_cfg.prefetch)
            )
            self.packers[j] = Packer(mixture, encoder, seq_length, PAD_ID, data_cfg.overlong, feed, doc_multiple)
        self.may_end = any(s.epochs is not None for s in data_cfg.sources)  # else every stream is endless
        self.validation_cfg = list(data_cfg.validation)
        self.overlong = data_cfg.overlong
        self.seed = seed
        self._validation: list[PackedSequence] | None = None

    def step_batches(self, num_microbatches: int, micro_batch_size: int) -> list[dict[str, Any]]:
        """This rank's micro-batches of the next step; StopIteration (on every rank) once a stream is used up."""
        if num_microbatches * micro_batch_size != len(self.streams):
            raise ValueError(
                f"{num_microbatches} x {micro_batch_size} sequences per rank, but this rank has "
                f"{len(self.streams)} streams ({self.num_streams} sequences per step over {self.dp_size} ranks)"
            )
        try:
            mine, ended = [next(self.packers[j]) for j in self.streams], False
        except StopIteration:
            mine, ended = [], True
        if self.may_end and self.dp_size > 1 and dist.is_initialized():
            ended = any(self._gather(ended))  # all ranks stop at the same step
        if ended:
            raise StopIteration
        return [collate(mine[i : i + micro_batch_size], self.mel) for i in range(0, len(mine), micro_batch_size)]

    def validation_batches(self, iters: int, micro_batch_size: int) -> list[dict[str, Any]]:
        """This rank's share of the first `iters * micro_batch_size * dp` packed validation sequences."""
        if not self.validation_cfg:
            return []
        if self._validation is None:
            sources = [open_source(s.path, s.format, s.name) for s in self.validation_cfg]
            mixture = Mixture(
                sources, [s.ratio for s in self.validation_cfg], [1.0] * len(sources), seed=self.seed, shuffle_buffer=0
            )
            packer = Packer(
                mixture, self.encoder, self.seq_length, PAD_ID, self.overlong, doc_multiple=self.doc_multiple
            )
            self._validation = []
            for seq in packer:
                self._validation.append(seq)
                if len(self._validation) == iters * micro_batch_size * self.dp_size:
                    break
        mine = self._validation[self.dp_rank :: self.dp_size]
        return [collate(mine[i : i + micro_batch_size], self.mel) for i in range(0, len(mine), micro_batch_size)]

    def _gather(self, obj: Any) -> list[Any]:
        """`obj` of every DP rank (a collective: every rank of the group calls it)."""
        out: list[Any] = [None] * self.dp_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Every stream's position (a collective over the DP group when there are several ranks)."""
        local = {j: self.packers[j].state_dict() for j in self.streams}
        parts = self._gather(local) if self.dp_size > 1 and dist.is_initialized() else [local]
        streams: list[Any] = [None] * self.num_streams
        for part in parts:
            for j, state in part.items():
                streams[j] = state
        return {"num_streams": self.num_streams, "streams": streams}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "streams" not in state:
            raise DataSourceError(
                "checkpoint data position: written by the single-stream loader (before per-sequence streams); "
                "this run cannot continue its data order (start a new run, or set checkpoint.resume=false)"
            )
        if state["num_streams"] != self.num_streams:
            raise DataSourceError(
                f"checkpoint data position: {state['num_streams']} sequences per step, this run has "
                f"{self.num_streams}: keep training.global_batch_size when resuming"
            )
        for j in self.streams:
            self.packers[j].load_state_dict(state["streams"][j])

    def close(self) -> None:
        """Stop the worker processes (also done when the object is collected or the process exits)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
