"""Context parallelism with audio (issue 22): each CP rank's decoder inputs are its slices of the CP=1 inputs.

The tiny Voxtral (real encoder, projector and embedding, loaded from its HF safetensors) embeds a micro-batch of
two packed rows (several clips, packed documents, a text-only one) at CP=1 and, for CP=2 and CP=4, as each CP
rank does: only its positions in Megatron-Core's load-balanced THD order, encoding only the chunks those need.
Ranks run one after another in this process (the embedding needs no communication); exact equality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_ext.audio.features import audio_tokens_per_chunk
from megatron_ext.checkpoint import mapping
from megatron_ext.compat.cpu import destroy_distributed, init_distributed
from megatron_ext.config import ConfigError
from megatron_ext.data.chat import EncodedDoc
from megatron_ext.data.packing import collate, pack
from megatron_ext.models.build import BuildConfig, build_model
from megatron_ext.models.cp_audio import ContextParallelLayoutError, local_audio, partition_index
from megatron_ext.models.decoder import thd_rank_positions
from megatron_ext.models.loading import load_full_tensors
from megatron_ext.parallel_layout import validate_parallelism
from megatron_ext.testing.tiny_models import VOXTRAL
from megatron_ext.training.config import TrainConfigError, load_config

PER_CHUNK = audio_tokens_per_chunk()  # 375
AUDIO, BEGIN_AUDIO = VOXTRAL.audio_token_id, 25
SEQ = 2048
TINY_CPU = Path(__file__).resolve().parents[1] / "examples/configs/tiny_cpu.yaml"


def _te_partition(cu_padded: list[int], cp: int, rank: int) -> list[int]:
    """Transformer Engine's `thd_get_partitioned_indices` kernel, token by token: local token t of sequence i
    (local length L_i / cp) maps to its sequence start + t + (L_i / 2cp) x (rank, or 2cp - 2 - rank past the
    first half)."""
    local = [b // cp for b in cu_padded]
    out = []
    for t in range(cu_padded[-1] // cp):
        seq = max(i for i in range(len(local) - 1) if local[i] <= t)
        length, index = local[seq + 1] - local[seq], t - local[seq]
        offset = rank if index < length // 2 else 2 * cp - 2 - rank
        out.append(index + local[seq] * cp + length // 2 * offset)
    return out


def test_partition_index_is_transformer_engines_order() -> None:
    for cp in (1, 2, 4):
        cu = torch.tensor([0, 8 * cp, 10 * cp, 24 * cp, 26 * cp])
        held = [partition_index(cu, cp, r).tolist() for r in range(cp)]
        for rank in range(cp):
            assert held[rank] == _te_partition(cu.tolist(), cp, rank)
        assert sorted(sum(held, [])) == list(range(26 * cp))  # every position on exactly one rank
    with pytest.raises(ContextParallelLayoutError, match="document 1 spans 6 positions: .*multiple of 2 x cp = 4"):
        partition_index(torch.tensor([0, 8, 14]), 2, 0)


def test_llama4_query_positions_follow_the_rank_slices() -> None:
    """Devstral-2's query scale under THD + CP reads each held token's position inside its document."""
    cu = torch.tensor([0, 8, 24])
    assert thd_rank_positions(cu, 2, 0).tolist() == [0, 1, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15]
    assert thd_rank_positions(cu, 2, 1).tolist() == [2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10, 11]
    assert thd_rank_positions(cu, 1, 0).tolist() == list(range(8)) + list(range(16))


def _doc(seed: int, text: int, chunks: list[int]) -> EncodedDoc:
    """A document: text, then one clip per entry of `chunks` ([BEGIN_AUDIO] + its chunks' [AUDIO] tokens), text."""
    rng = np.random.default_rng(seed)
    ids = [1, *rng.integers(1000, 2048, text)]
    for n in chunks:
        ids += [BEGIN_AUDIO] + [AUDIO] * (PER_CHUNK * n)
    ids += [4, *rng.integers(1000, 2048, 13)]
    mels = [rng.standard_normal((128, 3000)).astype(np.float32) for _ in range(sum(chunks))]
    return EncodedDoc(np.array(ids, dtype=np.int64), np.ones(len(ids), bool), mels=mels)


ROWS = (
    (_doc(0, 29, [1]), _doc(1, 3, [2]), _doc(2, 90, [])),
    (_doc(3, 11, []), _doc(4, 7, [1, 2])),
)


def _micro_batch(doc_multiple: int) -> dict:
    """Two packed rows of 6 chunks in all: clips of 1 and 2 chunks, text-only documents, padding, 2 clips in one."""
    packed = [pack(docs, [0] * len(docs), SEQ, 11, doc_multiple) for docs in ROWS]
    return collate(packed, None)


@pytest.fixture(scope="module")
def model(tiny_dir: Path):
    init_distributed(tp=1)
    model = build_model(VOXTRAL, BuildConfig(init_weights=False))
    hf = load_file(str(tiny_dir / "voxtral-hf" / "model.safetensors"))
    load_full_tensors(model, dict(mapping.hf_to_megatron(VOXTRAL, hf.__getitem__)).__getitem__)
    yield model.eval()
    destroy_distributed()


@pytest.mark.parametrize("cp", [2, 4])
@torch.no_grad()
def test_each_cp_rank_gets_its_slices_of_the_cp1_inputs(model, cp: int) -> None:
    batch = _micro_batch(2 * cp)
    cu_padded = batch["cu_seqlens_padded"]
    assert all(n % (2 * cp) == 0 for n in torch.diff(cu_padded).tolist())  # every document cut into 2cp slices
    assert batch["cu_seqlens"][-1] < cu_padded[-1] == 2 * SEQ  # the real lengths exclude the CP padding
    ids, mel = batch["tokens"].reshape(1, -1), batch["mel"]  # THD: one flat stream
    assert mel.shape[0] == 6
    full = model.embed(ids, mel)  # CP=1: [2 * SEQ, 1, h]

    encoded: list[torch.Tensor] = []
    hook = model.audio_encoder.register_forward_hook(lambda _m, args, _out: encoded.append(args[0]))
    audio_ordinal = torch.cumsum(ids[0] == AUDIO, 0) - 1
    chunks_of_rank = []
    try:
        for rank in range(cp):
            index = partition_index(cu_padded, cp, rank)
            encoded.clear()
            local = model.embed(ids, mel, index)
            assert torch.equal(local, full[index]), f"CP={cp} rank {rank}"
            # the chunks owning one of this rank's [AUDIO] positions, each once, and no other
            held = index[ids[0, index] == AUDIO]
            mine = sorted(set((audio_ordinal[held] // PER_CHUNK).tolist()))
            assert len(encoded) == (1 if mine else 0)
            if mine:
                assert torch.equal(encoded[0], mel[mine])
            assert local_audio(ids, index, AUDIO, PER_CHUNK).chunks.tolist() == mine
            chunks_of_rank.append(set(mine))
    finally:
        hook.remove()
    straddling = [c for c in range(6) if sum(c in s for s in chunks_of_rank) > 1]
    assert straddling, "no chunk straddles a slice boundary: the case is not covered"
    assert sum(len(s) for s in chunks_of_rank) < cp * 6  # no rank encodes every chunk
    assert set().union(*chunks_of_rank) == set(range(6))


def test_packing_pads_each_document_for_cp() -> None:
    row = _micro_batch(8)
    real, padded = torch.diff(row["cu_seqlens"]).tolist(), torch.diff(row["cu_seqlens_padded"]).tolist()
    assert all(p % 8 == 0 and 0 <= p - r < 8 for r, p in zip(real, padded, strict=True))
    starts = row["cu_seqlens_padded"][:-1].tolist()
    flat_loss, flat_src = row["loss_mask"].reshape(-1), row["source_ids"].reshape(-1)
    for start, r, p in zip(starts, real, padded, strict=True):
        assert flat_loss[start + r : start + p].sum() == 0 and (flat_src[start + r : start + p] < 0).all()
    unpadded = _micro_batch(1)
    assert torch.equal(unpadded["cu_seqlens"], unpadded["cu_seqlens_padded"])
    assert row["doc_lengths"] == unpadded["doc_lengths"] == [len(d) - 1 for d in (*ROWS[0], *ROWS[1])]
    full = pack([_doc(5, 1003, [])], [0], 1024, 11, 8)  # 1017 tokens + 7 CP padding positions: no padding tail
    assert full.doc_lens == [1017] and full.padded_lens == [1024] and collate([full], None)["doc_lengths"] == [1017]


def test_cp_bad_inputs_one_line_each() -> None:
    with pytest.raises(TrainConfigError) as info:
        load_config(TINY_CPU, ["parallel.context_parallel_size=4", "training.seq_length=1020"])
    msg = str(info.value)
    assert msg.startswith("training.seq_length=1020: context_parallel_size=4") and "multiple of 8" in msg
    with pytest.raises(TrainConfigError, match=r"each CP rank's 518 positions .*size=4 .* multiple of 8$"):
        load_config(
            TINY_CPU,
            [
                "parallel.context_parallel_size=2",
                "parallel.tensor_model_parallel_size=4",
                "parallel.sequence_parallel=true",
                "training.seq_length=1036",
            ],
        )
    with pytest.raises(ConfigError) as refused:
        validate_parallelism(VOXTRAL, tp=1, cp=2, backend="local")
    assert "local attention has no context parallelism" in str(refused.value) and "\n" not in str(refused.value)
    validate_parallelism(VOXTRAL, tp=1, cp=2, backend="te")  # TE: CP with audio is chunk parallelism
