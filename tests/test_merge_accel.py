"""The accelerations (`megatron_ext.merge.accel`) against the plain methods: the same bits everywhere.

Whole merges of the tiny parents (fp32 and bf16 copies) with accelerations on and off give identical
output bytes; random bf16 and fp32 tensors of odd sizes (tails of every kind, several chunks) give
identical bits through every accelerated function at 1-3 torch threads; the fused kernels match torch's
passes, the finiteness check sees every exponent, and the compiled kernels are cached safely.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ext.merge import accel
from megatron_ext.merge.accel import bf16_kernels
from megatron_ext.merge.accel import methods as fast
from megatron_ext.merge.accel.kernel_pool import KernelPool
from megatron_ext.merge.methods import METHODS, MergeParams
from megatron_ext.merge.methods import linear as plain_linear
from megatron_ext.merge.methods import slerp as plain_slerp
from megatron_ext.merge.methods.base import CHUNK
from megatron_ext.merge.methods.linear import linear
from megatron_ext.merge.run import MergeJob, run_merge
from megatron_ext.user_cache import CACHE_ENV

GEN = torch.Generator().manual_seed(0)
REPO = Path(__file__).resolve().parents[1]
CASES = [
    MergeParams(method="linear", alpha=0.1),
    MergeParams(method="linear", alpha=0.35),
    MergeParams(method="slerp", alpha=0.3),
    MergeParams(method="della", alpha=0.5, density=0.5, seed=1),
]


def _copy_as_bf16(src: Path, dst: Path) -> Path:
    """An HF checkpoint directory with every tensor of `src` in bfloat16."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    save_file({n: t.bfloat16() for n, t in tensors.items()}, str(dst / "model.safetensors"), {"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    return dst


@pytest.fixture(scope="module")
def parents(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(devstral, voxtral) per dtype: the tiny fp32 parents and bf16 copies (the fused kernels' inputs)."""
    root = tmp_path_factory.mktemp("accel_parents")
    fp32 = (tiny_dir / "devstral-hf", tiny_dir / "voxtral-hf")
    return {"float32": fp32, "bfloat16": tuple(_copy_as_bf16(p, root / p.name) for p in fp32)}


def _files(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("params", CASES, ids=lambda p: f"{p.method}-{p.alpha}")
def test_merges_have_the_same_bytes_with_and_without_accel(
    parents, params: MergeParams, dtype: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF output of the tiny parents, every file byte for byte (tensors, config, provenance)."""
    dev, vox = parents[dtype]
    outputs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(accel.ENV, flag)
        out = tmp_path / f"accel{flag}"
        run_merge(MergeJob(dev, vox, out, params, rope_from="devstral", progress=False))
        outputs[flag] = _files(out)
    assert "model.safetensors" in outputs["1"]
    assert outputs["1"] == outputs["0"]


def test_no_accel_flag_merges_plainly_with_the_same_bytes(parents, tmp_path: Path) -> None:
    """`tools/merge.py --no-accel` on bf16 parents: no kernel is compiled or loaded (no kernel object appears
    in an emptied cache) and the output equals the accelerated merge's."""
    dev, vox = parents["bfloat16"]
    env = {**os.environ, CACHE_ENV: str(tmp_path / "cache")}
    env.pop(accel.ENV, None)
    outputs = {}
    for extra in ([], ["--no-accel"]):
        out = tmp_path / f"out{len(extra)}"
        cmd = [sys.executable, str(REPO / "tools/merge.py"), "--devstral", str(dev), "--voxtral", str(vox)]
        cmd += ["--method", "slerp", "--alpha", "0.3", "--rope-from", "devstral", "--output", str(out)]
        if extra:
            shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        res = subprocess.run(cmd + ["--no-progress", *extra], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        outputs[bool(extra)] = _files(out)
    assert not list((tmp_path / "cache").glob("bf16_kernels-*"))  # the cache also holds file digests
    assert outputs[True] == outputs[False]


def test_the_switch_selects_plain_or_accelerated_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(accel.ENV, "0")
    assert not accel.enabled() and all(accel.method(n) is METHODS[n] for n in METHODS)
    assert accel.all_finite(torch.zeros(4, dtype=torch.bfloat16)) is None
    monkeypatch.delenv(accel.ENV)
    assert accel.enabled() and accel.method("della") is METHODS["della"]
    assert isinstance(accel.method("slerp"), fast.Slerp) and isinstance(accel.method("linear"), fast.Linear)
    assert accel.all_finite(torch.zeros(4, dtype=torch.bfloat16)) is True


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_random_tensors_of_odd_sizes_have_the_same_bits(threads: int, dtype: torch.dtype) -> None:
    """Sizes with every kind of tail (below a vector, odd, around the thread-split threshold, several
    chunks plus a few elements): linear, SLERP, its coefficients and rows, accelerated vs plain, exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (1, 5, 37, 1001, 32_769, 100_003, 2 * CHUNK + 7):
            scale = torch.rand(n, generator=GEN).mul(30).sub(15).exp2()
            x = (torch.randn(n, generator=GEN) * scale).to(dtype)
            y = (0.3 * x.float() + torch.randn(n, generator=GEN) * scale).to(dtype).reshape(-1, 1)
            x = x.reshape(-1, 1)  # a column: any shape is flattened alike
            for w in ([0.9, 0.1], [0.6, 0.7]):
                assert torch.equal(_bits(fast.linear([x, y], w)), _bits(plain_linear.linear([x, y], w))), (n, w)
            for t in (0.1, 0.7):
                ours, plain = fast.slerp(t, x, y), plain_slerp.slerp(t, x, y)
                assert torch.get_num_threads() == threads  # the pool gives torch its threads back
                assert torch.equal(_bits(ours), _bits(plain)), (n, t)
            with KernelPool() as pool:
                ca, cb = fast.slerp_coefficients(0.3, x, y, pool)
                rows = fast.slerp_rows(x[: n // 2 + 1], y[: n // 2 + 1], ca, cb)
            assert (ca, cb) == plain_slerp.slerp_coefficients(0.3, x, y), n
            assert torch.equal(_bits(rows), _bits(plain_slerp.slerp_rows(x[: n // 2 + 1], y[: n // 2 + 1], ca, cb)))
    finally:
        torch.set_num_threads(before)


def test_bf16_finite_check_sees_every_exponent() -> None:
    """The exponent-bit kernel against torch.isfinite on windows over all 65536 bf16 bit patterns (every
    NaN and Inf, at every lane of the 16-element groups and in the tails), and on all finite patterns."""
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for start in range(0, 65536, 37):
        window = patterns[start : start + 53]
        assert bf16_kernels.all_finite(window) == bool(torch.isfinite(window).all()), start
    assert bf16_kernels.all_finite(patterns[torch.isfinite(patterns)])


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
        linear([x, y], weights, reference)
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
            for n in {len(u), len(u) - 3, 100_003 % len(u), 8 * 33 + 5, 13}:
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
from megatron_ext.merge.accel import bf16_kernels
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
