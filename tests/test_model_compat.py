"""megatron_ext.compat.cpu: Megatron-Core training paths on a CPU-only torch (single gloo process)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from megatron_ext.compat.cpu import apply_cpu_patches, cpu_only, destroy_distributed, init_distributed

pytestmark = pytest.mark.skipif(not cpu_only(), reason="the patches are a no-op with CUDA")


@pytest.fixture()
def dist1() -> Iterator[None]:
    init_distributed(tp=1, pp=1, seed=7)
    yield
    destroy_distributed()


def _tiny_gpt():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        use_cpu_initialization=True,
        hidden_dropout=0.1,
        attention_dropout=0.0,
    )
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    return cfg, GPTModel(cfg, spec, vocab_size=64, max_sequence_length=32, position_embedding_type="rope")


def _train(distributed_optimizer: bool, steps: int = 3) -> tuple[list[float], torch.nn.Module]:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg, model = _tiny_gpt()
    cfg.finalize_model_grads_func = finalize_model_grads
    ddp_cfg = DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer)
    ddp = DistributedDataParallel(cfg, ddp_cfg, model)
    opt_cfg = OptimizerConfig(lr=1e-2, use_distributed_optimizer=distributed_optimizer, clip_grad=1.0)
    opt = get_megatron_optimizer(opt_cfg, [ddp])
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, 16)

    def step(_it, mod):
        out = mod(tokens, positions, None, labels=tokens)
        return out, lambda o: (o.mean(), {"loss": o.mean().detach()})

    losses = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([None]),
            model=[ddp],
            num_microbatches=1,
            seq_length=16,
            micro_batch_size=2,
        )
        ok, grad_norm, _ = opt.step()
        assert ok and grad_norm > 0
        losses.append(float(out[0]["loss"]))
    return losses, model


def test_apply_is_idempotent() -> None:
    assert apply_cpu_patches() and apply_cpu_patches()
    assert torch.ones(2, device="cuda").device.type == "cpu"
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"


class _CudaLiteralInBackward(torch.autograd.Function):
    """Backward builds a tensor with device="cuda", as Megatron's causal mask does under activation recompute."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * torch.full((1,), 2.0, device="cuda")


def test_cuda_literals_inside_backward() -> None:
    apply_cpu_patches()
    x = torch.ones(3, requires_grad=True)
    _CudaLiteralInBackward.apply(x).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]
    y = torch.ones(2, requires_grad=True)
    torch.autograd.backward([_CudaLiteralInBackward.apply(y)], grad_tensors=[torch.ones(2)])
    assert y.grad.tolist() == [2.0, 2.0]
    with pytest.raises(RuntimeError, match="only for scalar outputs"):
        _CudaLiteralInBackward.apply(y).backward()


def test_ddp_optimizer_schedule_with_and_without_distributed_optimizer(dist1: None) -> None:
    plain, _ = _train(distributed_optimizer=False)
    destroy_distributed()
    init_distributed(tp=1, pp=1, seed=7)
    sharded, _ = _train(distributed_optimizer=True)
    assert plain[-1] < plain[0]
    assert plain == pytest.approx(sharded, abs=1e-6)


@pytest.mark.slow  # a torch_dist save spawns its async writer: ~8 s
def test_dist_checkpointing_round_trip(dist1: None, tmp_path: Path) -> None:
    from megatron.core import dist_checkpointing

    _, model = _train(distributed_optimizer=False, steps=1)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    _, fresh = _tiny_gpt()
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path)))
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
