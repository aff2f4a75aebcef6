"""Golden math of the merge functions: SLERP end points and fallbacks, DELLA keep probabilities and sign
election, parameter validation, and the existence threshold of the tokenizer-aware row merge."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.merge.embeddings import merge_vocab_rows
from megatron_ext.merge.methods import METHODS, MergeParams, TensorContext
from megatron_ext.merge.methods.della import elect_and_fuse, keep_probabilities
from megatron_ext.merge.methods.linear import linear
from megatron_ext.merge.methods.slerp import slerp
from megatron_ext.merge.parents import is_finite
from megatron_ext.tokenizer.align import TokenizerAlignment

GEN = torch.Generator().manual_seed(0)


def test_slerp_end_points_and_angle() -> None:
    a, b = torch.randn(4, 8, generator=GEN), torch.randn(4, 8, generator=GEN)
    assert torch.allclose(slerp(0.0, a, b), a, atol=1e-6) and torch.allclose(slerp(1.0, a, b), b, atol=1e-5)
    # orthonormal unit vectors: the midpoint stays on the unit circle at 45 degrees (rel. 1e-6)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp(0.5, e1, e2)
    assert torch.allclose(mid, torch.tensor([2**-0.5, 2**-0.5]), rtol=1e-6)


def test_slerp_falls_back_to_linear_when_degenerate() -> None:
    a = torch.randn(16, generator=GEN)
    assert torch.equal(slerp(0.3, a, 2 * a), 0.7 * a + 0.3 * (2 * a))  # collinear: |cos| > 0.9995
    z = torch.zeros(16)
    out = slerp(0.3, z, a)  # zero norm counts as 1: cos = 0, finite result
    assert torch.isfinite(out).all()


def test_linear_weighted_average() -> None:
    a, b = torch.randn(3, 5, generator=GEN), torch.randn(3, 5, generator=GEN)
    assert torch.allclose(linear([a, b], [0.9, 0.1]), 0.9 * a + 0.1 * b, atol=1e-7)
    assert torch.equal(linear([a, b], [1.0, 0.0]), a)


def test_keep_probabilities_follow_magnitude_rank_per_row() -> None:
    delta = torch.tensor([[0.1, -3.0, 2.0, 0.0, -1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    p = keep_probabilities(delta, 0.5, 0.1)
    assert torch.allclose(p[0], torch.tensor([0.45, 0.6, 0.55, 0.4, 0.5]))
    assert torch.allclose(p[1], torch.tensor([0.6, 0.55, 0.5, 0.45, 0.4]))


def test_sign_election_keeps_the_majority_mass() -> None:
    d1, d2 = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-3.0, -1.0, 1.0])
    fused = elect_and_fuse([d1, d2], [1.0, 1.0])
    # elem 0: mass -2 -> only d2 agrees; elem 1: both; elem 2: both positive -> mean
    assert torch.equal(fused, torch.tensor([-3.0, -1.0, 1.5]))


@pytest.mark.parametrize(
    "params, message",
    [
        (MergeParams(method="linear", alpha=1.5), "alpha=1.5"),
        (MergeParams(method="della", density=0.1, epsilon=0.1), "must lie in (0, 1]"),
        (MergeParams(method="della", density=0.9, epsilon=0.2), "must lie in (0, 1]"),
        (MergeParams(method="della", density=0.6, epsilon=0.1, mlp_density_boost=0.35), "must lie in (0, 1]"),
        (MergeParams(method="ties"), "method='ties'"),
    ],
)
def test_parameter_validation(params: MergeParams, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        params.validate()


def test_common_special_row_below_threshold_is_taken_from_the_other_parent() -> None:
    alignment = TokenizerAlignment(
        num_special_tokens=4,
        vocab_size=8,
        common=["<s>", "</s>"],
        voxtral_only=["[AUDIO]"],
        devstral_only=[],
        voxtral_to_merged={0: 0, 1: 1, 3: 2},
        merged_specials={0: "<s>", 1: "</s>", 2: "[AUDIO]"},
        devstral_tokenizer_sha256="d",
        voxtral_tokenizer_sha256="v",
    )
    dev, vox = torch.randn(8, 3, generator=GEN), torch.randn(8, 3, generator=GEN)
    dev[1] = 0.0  # Devstral's </s> row is untrained: Voxtral's row is used as is
    out, stats = merge_vocab_rows(
        dev,
        vox,
        None,
        alignment,
        METHODS["linear"],
        MergeParams(method="linear", alpha=0.2),
        TensorContext("emb"),
        min_row_norm=1e-6,
    )
    assert torch.equal(out[0], linear([dev[0], vox[0]], [0.8, 0.2]))
    assert torch.equal(out[1], vox[1]) and torch.equal(out[2], vox[3]) and torch.equal(out[3], dev[3])
    assert torch.equal(out[4:], linear([dev[4:], vox[4:]], [0.8, 0.2]))
    assert stats == {"averaged": 1, "copied_from_voxtral": 2}


@pytest.mark.parametrize("accel", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_is_finite_finds_any_nan_or_inf(dtype: torch.dtype, accel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGATRON_EXT_MERGE_ACCEL", accel)
    x = torch.randn(3000, 7).to(dtype)
    assert is_finite(x) and is_finite(x[:0]) and is_finite(torch.tensor(1.0, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, 12345, x.numel() - 1):
            y = x.clone()
            y.view(-1)[pos] = bad
            assert not is_finite(y), (bad, pos)
