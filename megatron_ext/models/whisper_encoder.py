"""Whisper-large-v3 encoder (Voxtral's audio tower) on Megatron-Core: conv stem + sinusoids, a
bidirectional `TransformerBlock`, final LayerNorm.

Each 30 s chunk is one batch column of the block, so chunks never attend to each other. Attention heads are
split over tensor-parallel ranks (or, given a one-rank TP group, the whole encoder is replicated on each); the
conv stem is replicated and outputs are replicated (no sequence parallelism inside the encoder). Attribute
names give the checkpoint names `audio_encoder.conv{1,2}.*` and `audio_encoder.decoder.*`; the sinusoidal
table is a non-persistent buffer, recomputed on load.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.audio.positions import sinusoids
from megatron_ext.config import EncoderConfig


def conv_stem(
    mel: torch.Tensor, conv1: torch.nn.Conv1d, conv2: torch.nn.Conv1d, positions: torch.Tensor
) -> torch.Tensor:
    """Whisper's stem: log-mel [chunks, mels, frames] -> conv1+GELU, conv2 (stride 2)+GELU, + sinusoids.

    Returns Megatron's sequence-first layout [positions, chunks, d]: the one transpose from HF's [b, s, h].
    """
    frames = positions.shape[0] * conv1.stride[0] * conv2.stride[0]
    if mel.dim() != 3 or mel.shape[1] != conv1.in_channels or mel.shape[2] != frames:
        raise ValueError(
            f"audio features must be [chunks, {conv1.in_channels}, {frames}] (30 s chunks), got {list(mel.shape)}"
        )
    x = torch.nn.functional.gelu(conv1(mel.to(conv1.weight.dtype)))
    x = torch.nn.functional.gelu(conv2(x))  # [chunks, d, positions]
    return (x.permute(2, 0, 1) + positions[:, None, :]).to(conv1.weight.dtype)


class WhisperEncoder(MegatronModule):
    """log-mel [chunks, mels, 3000] -> hidden states [1500, chunks, d] (sequence-first)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: ModuleSpec,
        encoder: EncoderConfig,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        """`pg_collection`: None splits heads over Megatron's TP group; a TP group of this rank alone replicates."""
        super().__init__(config=config)
        d, dtype = encoder.hidden_size, config.params_dtype
        self.conv1 = torch.nn.Conv1d(encoder.num_mel_bins, d, kernel_size=3, padding=1, dtype=dtype)
        self.conv2 = torch.nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1, dtype=dtype)
        self.register_buffer("positions", sinusoids(encoder.max_source_positions, d), persistent=False)
        self.decoder = TransformerBlock(
            config=config,
            spec=layer_spec,
            post_layer_norm=True,
            pre_process=True,
            post_process=True,
            pg_collection=pg_collection,
        )
        # a replica's TP rank in Megatron's TP group (its layers' own TP group is this rank alone)
        self.replica_tp_rank = None if pg_collection is None else parallel_state.get_tensor_model_parallel_rank()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """Megatron's, with a replicated encoder's copies told apart by their TP rank: within a one-rank TP group
        every TP rank would claim the main replica, which a torch_dist save refuses as overlapping shards."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.replica_tp_rank is not None:
            for shard in nested_values(sharded):
                if isinstance(shard, ShardedBase) and isinstance(shard.replica_id, tuple):
                    shard.replica_id = (shard.replica_id[0], self.replica_tp_rank, *shard.replica_id[2:])
        return sharded

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        hidden = conv_stem(mel.to(self.conv1.weight.device), self.conv1, self.conv2, self.positions)
        return self.decoder(hidden_states=hidden, attention_mask=None)
