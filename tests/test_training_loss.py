"""The chunked supervised-token loss (training/loss.py) against F.cross_entropy on the supervised positions.

Values and gradients (hidden states and LM-head weight) at TP=1 for several chunk sizes, with ignored
positions, and vocab-parallel at TP=2 (two gloo processes on CPU, with and without sequence parallelism).
Everything is fp32: per-token losses and gradients agree to TOL (the chunked path only reorders the
log-sum-exp and the matmuls).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_ext.compat.cpu import _free_port

TOL = 1e-5  # absolute and relative, fp32
B, S, H, VOCAB = 2, 10, 16, 32  # S even: sequence parallelism splits it over two ranks
IGNORED = -100  # label value at unsupervised positions: out of the vocabulary, so it must never be read


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [s, b, h] (Megatron's sequence-first layout), LM head [vocab, h], labels and loss_mask [b, s]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=g)
    weight = torch.randn(VOCAB, H, generator=g) / H**0.5
    mask = (torch.rand(B, S, generator=g) < 0.6).long()
    mask[0, 0], mask[1, -1] = 0, 1  # at least one ignored and one supervised position
    labels = torch.where(mask.bool(), torch.randint(0, VOCAB, (B, S), generator=g), IGNORED)
    return hidden, weight, labels, mask


def _reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy of the full logits at the supervised positions, batch-major like loss_mask.nonzero()."""
    logits = hidden.transpose(0, 1) @ weight.t()  # [b, s, vocab]
    keep = mask.bool()
    return F.cross_entropy(logits[keep], labels[keep], reduction="none")


def _grads(loss_fn, hidden: torch.Tensor, weight: torch.Tensor, upstream: torch.Tensor):
    """Per-token losses and the gradients of sum(losses * upstream) w.r.t. hidden and weight."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    losses = loss_fn(h, w)
    (losses * upstream).sum().backward()
    return losses.detach(), h.grad, w.grad


@pytest.fixture(scope="module")
def tp1():
    """Megatron's parallel state for one process (the loss reduces over the TP group, here of size 1)."""
    from megatron_ext.compat.cpu import destroy_distributed, init_distributed

    init_distributed(tp=1)
    yield
    destroy_distributed()


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000], ids=["chunk1", "chunk3-odd", "chunk7-odd", "chunk-gt-tokens"])
def test_values_and_gradients_match_cross_entropy(tp1, chunk: int) -> None:
    from megatron_ext.training.loss import supervised_token_losses

    hidden, weight, labels, mask = _inputs(seed=1)
    n = int(mask.sum())
    assert 1 < n < 1000 and n % 3 and n % 7  # the odd chunk sizes end on a partial chunk
    upstream = torch.rand(n, generator=torch.Generator().manual_seed(1))  # distinct weight per token
    ours = _grads(lambda h, w: supervised_token_losses(h, w, labels, mask, chunk, False), hidden, weight, upstream)
    ref = _grads(lambda h, w: _reference(h, w, labels, mask), hidden, weight, upstream)
    assert ours[0].shape == (n,)
    for got, want, name in zip(ours, ref, ("losses", "hidden.grad", "weight.grad"), strict=True):
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL, msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():  # the inference path (no activation checkpointing) gives the same values
        torch.testing.assert_close(supervised_token_losses(hidden, weight, labels, mask, chunk, False), ref[0])


def test_ignored_positions_are_never_read(tp1) -> None:
    from megatron_ext.training.loss import supervised_token_losses

    hidden, weight, labels, mask = _inputs(seed=2)
    h = hidden.clone().requires_grad_()
    losses = supervised_token_losses(h, weight, labels, mask, 4, False)
    losses.sum().backward()
    ignored = ~mask.bool().t()  # [s, b], hidden's layout
    assert ignored.any() and (h.grad[ignored] == 0).all()
    changed = hidden.clone()
    changed[ignored] = 1e4  # wild hidden states and labels where nothing is supervised
    labels2 = torch.where(mask.bool(), labels, VOCAB + 7)
    torch.testing.assert_close(supervised_token_losses(changed, weight, labels2, mask, 4, False), losses.detach())


def test_no_supervised_token_gives_an_empty_loss_with_zero_gradients(tp1) -> None:
    from megatron_ext.training.loss import supervised_token_losses

    hidden, weight, labels, _ = _inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    losses = supervised_token_losses(h, w, labels, torch.zeros(B, S, dtype=torch.long), 3, False)
    assert losses.shape == (0,) and losses.dtype == torch.float32
    losses.sum().backward()  # still part of the graph: every rank joins the backward
    assert (w.grad == 0).all()


def _tp2_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megatron_ext.compat.cpu import destroy_distributed, init_distributed
    from megatron_ext.training.loss import supervised_token_losses

    init_distributed(tp=2)
    hidden, weight, labels, mask = _inputs(seed=3)
    n = int(mask.sum())
    upstream = torch.rand(n, generator=torch.Generator().manual_seed(4))
    ref_losses, ref_h, ref_w = _grads(lambda h, w: _reference(h, w, labels, mask), hidden, weight, upstream)
    rows = slice(rank * VOCAB // 2, (rank + 1) * VOCAB // 2)  # this rank's vocabulary shard
    seq = slice(rank * S // 2, (rank + 1) * S // 2)  # sequence parallel: this rank's s/TP positions
    results = {}
    for sp in (False, True):
        h_in = hidden[seq] if sp else hidden
        losses, h_grad, w_grad = _grads(
            lambda h, w, sp=sp: supervised_token_losses(h, w, labels, mask, 3, sp), h_in, weight[rows], upstream
        )
        want_h = ref_h[seq] if sp else ref_h
        results[f"sp={sp}"] = {
            "losses": float((losses - ref_losses).abs().max()),
            "hidden_grad": float((h_grad - want_h).abs().max()),
            "weight_grad": float((w_grad - ref_w[rows]).abs().max()),
            "scale": float(ref_losses.abs().max()),
        }
    destroy_distributed()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def test_vocab_parallel_tp2_matches_cross_entropy(tmp_path: Path) -> None:
    """Each rank holds half the LM head (and with sequence parallelism half the positions): the losses, the
    hidden-state gradient (all-reduced, or reduce-scattered) and each weight shard's gradient match TP=1."""
    mp.start_processes(_tp2_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(results) == {"sp=False", "sp=True"}
        for case, diffs in results.items():
            for key in ("losses", "hidden_grad", "weight_grad"):
                assert diffs[key] < TOL * max(1.0, diffs["scale"]), (rank, case, key, diffs[key])
