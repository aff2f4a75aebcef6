"""Step-wise micro-batches for one data-parallel rank, built from the config's sources.

Every rank runs the same packed stream (same seed) and takes its share of each step's global batch:
sequence j of a step goes to DP rank j % dp. So the data position is one global state, identical on all
ranks, saved in every checkpoint and valid for any DP size on resume. (The price: each rank tokenises the
whole stream; log-mel features are computed only for the rank's own sequences.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from megatron_ext.data.chat import ChatEncoder
from megatron_ext.data.mixture import Mixture
from megatron_ext.data.packing import PackedSequence, Packer, collate
from megatron_ext.data.sources import open_source

PAD_ID = 11  # Tekken <pad>


class SFTData:
    """Training stream (mixture -> packer) and a fixed validation set, for one DP rank."""

    def __init__(
        self,
        data_cfg: Any,
        seq_length: int,
        seed: int,
        encoder: ChatEncoder,
        mel: Callable[[np.ndarray], torch.Tensor] | None,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        self.encoder, self.mel = encoder, mel
        self.seq_length, self.dp_rank, self.dp_size = seq_length, dp_rank, dp_size
        self.source_names = [s.name for s in data_cfg.sources]
        self.source_modality = [s.modality for s in data_cfg.sources]
        sources = [open_source(s.path, s.format, s.name) for s in data_cfg.sources]
        mixture = Mixture(
            sources,
            [s.ratio for s in data_cfg.sources],
            [s.epochs for s in data_cfg.sources],
            seed=seed,
            shuffle_buffer=data_cfg.shuffle_buffer,
        )
        self.packer = Packer(mixture, encoder, seq_length, PAD_ID, data_cfg.overlong)
        self.validation_cfg = list(data_cfg.validation)
        self.overlong = data_cfg.overlong
        self.seed = seed
        self._validation: list[PackedSequence] | None = None

    def step_batches(self, num_microbatches: int, micro_batch_size: int) -> list[dict[str, Any]]:
        """This rank's micro-batches of the next step; StopIteration when the data is used up."""
        rows = [next(self.packer) for _ in range(num_microbatches * micro_batch_size * self.dp_size)]
        mine = rows[self.dp_rank :: self.dp_size]
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
            packer = Packer(mixture, self.encoder, self.seq_length, PAD_ID, self.overlong)
            self._validation = []
            for seq in packer:
                self._validation.append(seq)
                if len(self._validation) == iters * micro_batch_size * self.dp_size:
                    break
        mine = self._validation[self.dp_rank :: self.dp_size]
        return [collate(mine[i : i + micro_batch_size], self.mel) for i in range(0, len(mine), micro_batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return self.packer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.packer.load_state_dict(state)
