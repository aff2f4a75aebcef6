"""Golden math of the merge functions: SLERP end points and fallbacks, DELLA keep probabilities and sign
election, parameter validation, and the existence threshold of the tokenizer-aware row merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.merge import bf16_kernels
from megatron_ext.merge.embeddings import merge_vocab_rows
from megatron_ext.merge.methods import (
    GRAIN,
    METHODS,
    MergeParams,
    TensorContext,
    _linear_passes,
    elect_and_fuse,
    keep_probabilities,
    linear,
    slerp,
    threaded_sum,
)
from megatron_ext.merge.parents import is_finite
from megatron_ext.tokenizer.align import TokenizerAlignment
from megatron_ext.user_cache import CACHE_ENV

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_is_finite_finds_any_nan_or_inf(dtype: torch.dtype) -> None:
    x = torch.randn(3000, 7).to(dtype)
    assert is_finite(x) and is_finite(x[:0]) and is_finite(torch.tensor(1.0, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, 12345, x.numel() - 1):
            y = x.clone()
            y.view(-1)[pos] = bad
            assert not is_finite(y), (bad, pos)


def test_bf16_finite_check_sees_every_exponent() -> None:
    """The exponent-bit kernel against torch.isfinite on windows over all 65536 bf16 bit patterns (every
    NaN and Inf, at every lane of the 16-element groups and in the tails), and on all finite patterns."""
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for start in range(0, 65536, 37):
        window = patterns[start : start + 53]
        assert bf16_kernels.all_finite(window) == bool(torch.isfinite(window).all()), start
    assert bf16_kernels.all_finite(patterns[torch.isfinite(patterns)])


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_threaded_sum_has_the_bits_of_torchs_threaded_sum(threads: int) -> None:
    """Sizes around the split threshold and chunk sizes; a plain single-threaded sum differs for most."""
    before = torch.get_num_threads()
    differs = 0
    try:
        for n in (1000, GRAIN - 1, GRAIN, GRAIN + 1, 2 * GRAIN + 1, 100_003, 777_777, 1 << 20):
            x = torch.randn(n, generator=GEN) * torch.rand(n, generator=GEN).mul(8).exp2()  # mixed scales
            torch.set_num_threads(threads)
            reference = x.sum()
            torch.set_num_threads(1)
            assert torch.equal(threaded_sum(x, threads), reference), n
            differs += not torch.equal(x.sum(), reference)
    finally:
        torch.set_num_threads(before)
    assert differs >= 3  # the split matters, so the test can fail


def _bf16_samples(n: int) -> torch.Tensor:
    """Random bf16 values of mixed scales plus signed zeros, infinities, NaN, subnormals and extremes."""
    x = (torch.randn(n, generator=GEN) * torch.logspace(-30, 30, n)[torch.randperm(n, generator=GEN)]).bfloat16()
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, 3.3e38, -3.3e38])
    x[: len(special)] = special.bfloat16()
    return x


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (signed zeros included), except that any NaN equals any NaN."""
    nan = a.isnan()
    bits = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(bits), b[~nan].view(bits))


def test_fused_bf16_kernels_give_the_torch_passes_bits() -> None:
    n = 100_000
    x, y = _bf16_samples(n), _bf16_samples(n).flip(0)
    for ca, cb in ((0.9011882543563843, 0.1006891205906868), (-0.25, 1.5), (1.0, 0.0)):
        out = torch.empty(n, dtype=torch.bfloat16)
        bf16_kernels.slerp_rows(x, y, ca, cb, out)
        assert _same_bits(out, (x.float() * ca).add_(y.float() * cb).bfloat16())
    for weights in ([0.9, 0.1], [0.6, 0.7]):  # unit and non-unit sums
        w = torch.tensor(weights)
        out, reference = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
        bf16_kernels.linear(x, y, w[0].item(), w[1].item(), w.sum().item(), out)
        _linear_passes([x, y], w, reference)
        assert _same_bits(out, reference)


def test_fused_bf16_reductions_sum_as_torch_does() -> None:
    """Norms and the SLERP dot's sum of products: torch's single-threaded `vector_norm` / `sum` bits, for
    sizes that end in every way (whole cascade runs, leftover vectors, a scalar tail) and with specials."""
    m = 2**20 + 37  # deep enough for the sum's second cascade level
    finite = (torch.randn(m, generator=GEN) * torch.rand(m, generator=GEN).mul(100).sub(60).exp2()).bfloat16()
    finite[:2] = torch.tensor([1e-40, -0.0]).bfloat16()  # a subnormal, a signed zero
    special = _bf16_samples(1000)  # NaN, Inf, overflowing squares
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernels reproduce one thread's order (callers split like torch's threads)
    try:
        for u, v in ((finite, finite.flip(0)), (special, special.flip(0))):
            for n in {len(u), len(u) - 3, 100_003 % len(u), 8 * 33 + 5, 5}:
                a, b = u[:n], v[:n]
                ours = torch.tensor(bf16_kernels.norms(a, b))
                assert _same_bits(ours, torch.stack([torch.linalg.vector_norm(t.float()) for t in (a, b)])), n
                for na, nb in ((1.37, 0.81), (311.25, 3.0e-3)):
                    reference = ((a.float() / na) * (b.float() / nb)).sum()
                    assert _same_bits(bf16_kernels.products_sum(a, b, na, nb), reference), (n, na)
    finally:
        torch.set_num_threads(threads)


_KERNEL_CHILD = """
import json, torch
from megatron_ext.merge import bf16_kernels
x = torch.linspace(-3, 3, 45).bfloat16()
out = torch.empty_like(x)
bf16_kernels.slerp_rows(x, x.flip(0), 0.75, -0.5, out)
kernels = bf16_kernels._kernels()
print(json.dumps([kernels.compiled, str(kernels.cached), out.view(torch.int16).tolist()]))
"""


def test_bf16_kernels_are_compiled_once_and_a_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    """The first process compiles and caches the object code, the next loads it; a damaged cache file is
    compiled again, not loaded (LLVM crashes on a bad object file)."""
    env = {**os.environ, CACHE_ENV: str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def child() -> tuple[bool, Path, list[int]]:
        res = subprocess.run([sys.executable, "-c", _KERNEL_CHILD], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        compiled, cached, bits = json.loads(res.stdout)
        return compiled, Path(cached), bits

    x = torch.linspace(-3, 3, 45).bfloat16()
    expected = (x.float() * 0.75).add_(x.flip(0).float() * -0.5).bfloat16().view(torch.int16).tolist()
    compiled, cached, bits = child()
    assert compiled and cached.parent == tmp_path and cached.is_file() and bits == expected
    assert child() == (False, cached, expected)
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    assert child() == (True, cached, expected)
    assert child() == (False, cached, expected)
