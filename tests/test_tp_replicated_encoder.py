"""TP beyond the encoder's heads (issue 22): the frozen Whisper encoder replicated on every TP rank.

A tiny Voxtral with 8 KV groups and a 4-head encoder, random weights under HF names, loaded by every rank from
the same full tensors (as from one checkpoint). Spawned gloo ranks compare logits (gathered over TP) of an
audio + text batch with TP=1's, max-abs 1e-5: TP=2 with the encoder split and replicated (default tier), TP=8
with it replicated (8 processes: slow tier). The replicated encoder holds the whole tensors on every rank, has
no gradients and is not among the optimizer's parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron_ext.compat.cpu import _free_port
from megatron_ext.config import ModelConfig
from megatron_ext.parallel_layout import EncoderHeadsError, validate_parallelism
from megatron_ext.testing.tiny_models import TINY_DECODER, TINY_ENCODER
from megatron_ext.training.checks import StartupError, check_parallel_layout
from megatron_ext.training.config import TrainConfigError, load_config

TOL = 1e-5
KV8 = ModelConfig(
    dataclasses.replace(TINY_DECODER, num_attention_heads=8, num_query_groups=8), TINY_ENCODER, 24, 4, "voxtral"
)
TINY_CPU = Path(__file__).resolve().parents[1] / "examples/configs/tiny_cpu.yaml"


def _worker(rank: int, world: int, port: int, layouts: list[tuple[int, str]], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import determine_global_metadata, validate_sharding_integrity
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_ext.checkpoint import mapping
    from megatron_ext.compat.cpu import destroy_distributed, init_distributed
    from megatron_ext.models.build import BuildConfig, build_model
    from megatron_ext.models.loading import load_full_tensors
    from megatron_ext.testing.tiny_models import random_hf_state

    full = dict(mapping.hf_to_megatron(KV8, random_hf_state(KV8, seed=3).__getitem__))
    ids = torch.tensor([[1, 3, 25] + [24] * 375 + [4] + list(range(1100, 1131))])
    positions = torch.arange(ids.shape[1])[None]
    features = torch.randn(1, 128, 3000, generator=torch.Generator().manual_seed(0))

    def logits(tp: int, mode: str):
        init_distributed(tp=tp)
        model = build_model(KV8, BuildConfig(init_weights=False, encoder_parallel=mode))
        load_full_tensors(model, full.__getitem__)
        with torch.no_grad():
            out = model.eval()(ids, positions, audio_features=features, runtime_gather_output=True)
        return model, out

    model, ref = logits(1, "split")
    results = {"tp1_encoder_numel": sum(p.numel() for p in model.audio_encoder.parameters())}
    for tp, mode in layouts:
        model, out = logits(tp, mode)
        name = f"tp{tp}_{mode}"
        results[f"{name}_logits"] = (out - ref).abs().max().item()
        encoder = list(model.audio_encoder.parameters())
        results[f"{name}_encoder_numel"] = sum(p.numel() for p in encoder)
        results[f"{name}_encoder_frozen"] = not any(p.requires_grad for p in encoder)
        try:  # what a torch_dist save checks first: the encoder's main replicas cover every tensor exactly once
            shards = model.audio_encoder.sharded_state_dict(prefix="audio_encoder.")
            validate_sharding_integrity(determine_global_metadata(shards)[1])
            results[f"{name}_checkpoint_sharding"] = "valid"
        except CheckpointingException as exc:
            results[f"{name}_checkpoint_sharding"] = str(exc).splitlines()[0]
        if tp == 2:  # the optimizer never sees the frozen encoder
            ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
            opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4), [ddp])
            held = {id(p) for group in opt.param_groups for p in group["params"]}
            results[f"{name}_encoder_in_optimizer"] = any(id(p) in held for p in ddp.module.audio_encoder.parameters())
            results[f"{name}_optimizer_params"] = len(held)
    destroy_distributed()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _spawn(world: int, layouts: list[tuple[int, str]], tmp_path: Path) -> list[dict]:
    mp.start_processes(_worker, args=(world, _free_port(), layouts, str(tmp_path)), nprocs=world, start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def test_tp2_replicated_encoder_matches_split_and_tp1(tmp_path: Path) -> None:
    ranks = _spawn(2, [(2, "split"), (2, "replicate")], tmp_path)
    for res in ranks:
        assert res["tp2_split_logits"] < TOL and res["tp2_replicate_logits"] < TOL
        assert res["tp2_replicate_encoder_numel"] == res["tp1_encoder_numel"] > res["tp2_split_encoder_numel"]
        assert res["tp2_replicate_encoder_frozen"] and not res["tp2_replicate_encoder_in_optimizer"]
        assert res["tp2_replicate_checkpoint_sharding"] == res["tp2_split_checkpoint_sharding"] == "valid"
        assert res["tp2_replicate_optimizer_params"] == res["tp2_split_optimizer_params"] > 0


@pytest.mark.slow
def test_tp8_replicated_encoder_matches_tp1(tmp_path: Path) -> None:
    for res in _spawn(8, [(8, "replicate")], tmp_path):
        assert res["tp8_replicate_logits"] < TOL
        assert res["tp8_replicate_encoder_numel"] == res["tp1_encoder_numel"]
        assert res["tp8_replicate_encoder_frozen"] and res["tp8_replicate_checkpoint_sharding"] == "valid"


def test_tp_beyond_encoder_heads_needs_replication() -> None:
    with pytest.raises(EncoderHeadsError) as info:
        validate_parallelism(KV8, tp=8)
    assert str(info.value) == "tensor_model_parallel_size=8: the audio encoder's 4 attention heads need TP in [1, 2, 4]"
    validate_parallelism(KV8, tp=8, encoder_parallel="replicate")
    cfg = load_config(TINY_CPU, ["parallel.tensor_model_parallel_size=8"])
    with pytest.raises(StartupError) as startup:
        check_parallel_layout(cfg, KV8)
    msg = str(startup.value)
    assert msg.startswith("parallel: tensor_model_parallel_size=8: the audio encoder's 4 attention heads need TP")
    assert msg.endswith("or model.encoder_parallel=replicate (a copy of the frozen encoder per TP rank)")
    assert "\n" not in msg
    check_parallel_layout(
        load_config(TINY_CPU, ["parallel.tensor_model_parallel_size=8", "model.encoder_parallel=replicate"]), KV8
    )
    with pytest.raises(TrainConfigError, match=r"^model.encoder_parallel=replicate: needs model.freeze_encoder=true"):
        load_config(TINY_CPU, ["model.encoder_parallel=replicate", "model.freeze_encoder=false"])
    with pytest.raises(TrainConfigError, match=r"^model.encoder_parallel: 'copy' is not one of 'split', 'replicate'"):
        load_config(TINY_CPU, ["model.encoder_parallel=copy"])
