"""Tensor and pipeline parallelism of AudioLanguageModel: 2 gloo processes on CPU, one spawned run.

Each rank loads the tiny Voxtral (audio + text batch) at TP=1 (as DP=2), then TP=2 without and with
sequence parallel (logits and loss vs TP=1 within 1e-5 max-abs, gradients within 1e-5 relative to their
largest entry, the grad norm the optimizer would clip by within 1e-5 relative), then PP=2 forward/backward through
Megatron-Core's pipeline schedule (loss vs TP=1; gradients reach the first stage).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from megatron_ext.compat.cpu import _free_port

TOL = 1e-5


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per_chunk = 375
    ids = torch.tensor([[1, 3, 25] + [24] * per_chunk + [4] + list(range(1100, 1123))] * 2)  # s = 402
    ids[1, -5:] = torch.tensor([1500, 1501, 1502, 1503, 1504])
    features = torch.randn(2, 128, 3000, generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, dims=1)
    return ids, features, labels


def _worker(rank: int, world: int, port: int, tiny_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megatron.core import parallel_state
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from safetensors.torch import load_file

    from megatron_ext.checkpoint import mapping
    from megatron_ext.compat.cpu import destroy_distributed, init_distributed
    from megatron_ext.models.build import BuildConfig, build_model
    from megatron_ext.models.loading import load_full_tensors
    from megatron_ext.testing.tiny_models import VOXTRAL

    hf = load_file(str(Path(tiny_dir) / "voxtral-hf" / "model.safetensors"))
    full = dict(mapping.hf_to_megatron(VOXTRAL, hf.__getitem__))
    ids, features, labels = _batch()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    results: dict[str, float] = {}

    def load(tp: int, pp: int, sp: bool):
        init_distributed(tp=tp, pp=pp)
        model = build_model(VOXTRAL, BuildConfig(init_weights=False, sequence_parallel=sp))
        load_full_tensors(model, full.__getitem__)
        return model.eval()

    def run(model, **kwargs):
        """Logits (no grad), then loss and its backward; grads of a replicated norm and two TP-split weights, and
        the grad norm as Megatron's optimizer counts it (TP replicas once, shards of every TP rank)."""
        with torch.no_grad():
            logits = model(ids, positions, audio_features=features, **kwargs)
        loss = model(ids, positions, labels=labels, audio_features=features)
        loss.sum().backward()
        tp_group = parallel_state.get_tensor_model_parallel_group()
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            if getattr(p, "sequence_parallel", False):  # what finalize_model_grads does for SP-tagged params
                torch.distributed.all_reduce(p.grad, group=tp_group)
        layer = model.language_model.decoder.layers[0]
        grads = {
            "norm": model.language_model.decoder.final_layernorm.weight.grad,
            "qkv": layer.self_attention.linear_qkv.weight.grad,
            "fc2": layer.mlp.linear_fc2.weight.grad,
        }
        counted = [p.grad for p in trainable if param_is_not_tensor_parallel_duplicate(p, tp_group)]
        return logits, loss.detach(), grads, get_grad_norm_fp32(counted, grad_stats_parallel_group=tp_group)

    ref_logits, ref_loss, ref_grads, ref_norm = run(load(1, 1, False))
    for name, sp in (("tp2", False), ("tp2_sp", True)):
        logits, loss, grads, grad_norm = run(load(2, 1, sp), runtime_gather_output=True)
        r = parallel_state.get_tensor_model_parallel_rank()
        rows, cols = grads["qkv"].shape[0], grads["fc2"].shape[1]
        results[f"{name}_logits"] = (logits - ref_logits).abs().max().item()
        results[f"{name}_loss"] = (loss - ref_loss).abs().max().item()
        expected = {
            "norm": ref_grads["norm"],
            "qkv": ref_grads["qkv"][r * rows : (r + 1) * rows],
            "fc2": ref_grads["fc2"][:, r * cols : (r + 1) * cols],
        }
        # Relative to the largest gradient entry: the summed loss over 804 tokens makes grads O(10).
        results[f"{name}_grads"] = max(((grads[k] - v).abs().max() / v.abs().max()).item() for k, v in expected.items())
        results[f"{name}_grad_norm"] = abs(grad_norm - ref_norm) / ref_norm

    model = load(1, 2, False)
    model.train()

    def step(_it, mod):
        loss = mod(ids, positions, labels=labels, audio_features=features if mod.pre_process else None)
        return loss, lambda out: (out.mean(), {"loss": out.mean().detach()})

    out = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter([None]),
        model=[model],
        num_microbatches=1,
        seq_length=ids.shape[1],
        micro_batch_size=ids.shape[0],
        forward_only=False,
    )
    if model.post_process:
        results["pp2_loss"] = abs(float(out[0]["loss"]) - float(ref_loss.mean()))
    grads = [p.grad for p in model.language_model.parameters() if p.requires_grad]
    results["pp2_grads"] = float(all(g is not None and g.abs().sum() > 0 for g in grads))
    if model.pre_process:
        results["pp2_projector_grad"] = float(model.audio_projector.encoder.linear_fc1.weight.grad.abs().sum())
        results["pp2_encoder_frozen"] = float(all(p.grad is None for p in model.audio_encoder.parameters()))
    destroy_distributed()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def test_tp2_sp_and_pp2_match_tp1(tiny_dir: Path, tmp_path: Path) -> None:
    mp.start_processes(_worker, args=(2, _free_port(), str(tiny_dir), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in ranks:
        for name in ("tp2", "tp2_sp"):
            for key in ("logits", "loss", "grads", "grad_norm"):
                assert res[f"{name}_{key}"] < TOL, (name, key, res[f"{name}_{key}"])
        assert res["pp2_grads"] == 1.0
    assert ranks[1]["pp2_loss"] < TOL  # last stage holds the loss
    assert ranks[0]["pp2_projector_grad"] > 0 and ranks[0]["pp2_encoder_frozen"] == 1.0
