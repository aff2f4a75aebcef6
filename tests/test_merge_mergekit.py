"""Agreement with mergekit 0.1.5 (in-process) on the tiny parents, exported as MistralForCausalLM dirs.

Linear and SLERP: decoder tensors bit-for-bit in fp32 and within 1 ulp in bf16 (tolerance stated per
test); linear also on the regular-vocabulary rows of the embeddings and LM head. DELLA: statistics of
the pruned deltas (kept fraction, norm, regression slope on the input delta) agree; ours is
deterministic per seed; per_weight rescaling is unbiased (E[rescaled delta] = delta).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.synthetic import write_mistral_view
from megatron_ext.merge.accel import methods as accel_methods
from megatron_ext.merge.methods import MergeParams
from megatron_ext.merge.methods import slerp as plain_slerp
from megatron_ext.merge.methods.della import magprune, tensor_generator
from megatron_ext.merge.run import MergeJob, run_merge
from megatron_ext.testing.mergekit_reference import mergekit_config, run_mergekit

ALPHAS = (0.1, 0.3, 0.5, 0.9)
SPECIALS = 1000


def _copy_as(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    dst.mkdir(parents=True)
    save_file(
        {n: t.to(dtype) for n, t in load_file(src / "model.safetensors").items()},
        str(dst / "model.safetensors"),
        metadata={"format": "pt"},
    )
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "dtype": str(dtype).removeprefix("torch.")}))
    if (src / "tekken.json").exists():
        shutil.copy(src / "tekken.json", dst / "tekken.json")
    return dst


@pytest.fixture(scope="module")
def parents(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per dtype: devstral, voxtral (ours) and voxtral as a Mistral view (mergekit's input)."""
    root = tmp_path_factory.mktemp("mk_parents")
    fp32 = {"devstral": tiny_dir / "devstral-hf", "voxtral": tiny_dir / "voxtral-hf"}
    fp32["view"] = write_mistral_view(fp32["voxtral"], fp32["devstral"], root / "view32")
    bf16 = {k: _copy_as(p, root / f"{k}16", torch.bfloat16) for k, p in fp32.items()}
    return {"float32": fp32, "bfloat16": bf16}


def _ours(p: dict[str, Path], params: MergeParams, out: Path) -> dict[str, torch.Tensor]:
    run_merge(MergeJob(p["devstral"], p["voxtral"], out, params, rope_from="devstral", progress=False))
    return {
        _mistral_name(n): t for n, t in load_file(out / "model.safetensors").items() if n.startswith("language_model.")
    }


def _mistral_name(n: str) -> str:
    return (
        "lm_head.weight" if n == "language_model.lm_head.weight" else "model." + n.removeprefix("language_model.model.")
    )


def _theirs(
    p: dict[str, Path], params: MergeParams, dtype: str, out: Path, seed: int | None = None
) -> dict[str, torch.Tensor]:
    run_mergekit(mergekit_config(params, p["devstral"], p["view"], dtype), out, seed=seed)
    return load_file(out / "model.safetensors")


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two bf16 tensors (ordered-integer view)."""

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)

    return int((ordered(a) - ordered(b)).abs().max())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_matches_mergekit(parents, method: str, dtype: str, tmp_path: Path) -> None:
    """fp32: bit-for-bit; bf16: within 1 ulp (observed: 0). Several alphas per method."""
    for alpha in ALPHAS:
        params = MergeParams(method=method, alpha=alpha)
        ours = _ours(parents[dtype], params, tmp_path / f"ours{alpha}")
        theirs = _theirs(parents[dtype], params, dtype, tmp_path / f"mk{alpha}")
        assert set(ours) == set(theirs)
        for name, ref in theirs.items():
            mine = ours[name]
            assert mine.dtype == ref.dtype == getattr(torch, dtype)
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                if method == "slerp":
                    continue  # SLERP interpolates the regular block alone (tokenizer-aware), mergekit the whole matrix
                mine, ref = mine[SPECIALS:], ref[SPECIALS:]
            if dtype == "float32":
                assert torch.equal(mine, ref), f"{method} alpha={alpha}: {name} differs from mergekit"
            else:
                assert _ulps(mine, ref) <= 1, f"{method} alpha={alpha}: {name} more than 1 ulp from mergekit"


def _delta_stats(merged: torch.Tensor, dev: torch.Tensor, vox: torch.Tensor) -> list[float]:
    """[kept fraction, ||merged delta||, slope of merged delta regressed on the input delta]."""
    md, d = (merged - dev).double(), (vox - dev).double()
    return [float((md != 0).double().mean()), float(md.norm()), float((md * d).sum() / (d * d).sum())]


def _della_stats(parents, tmp_path: Path, seeds: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Stats [seed, tensor, 3] of ours and mergekit's DELLA over the 2-D decoder tensors."""
    p = parents["float32"]
    dev, vox = load_file(p["devstral"] / "model.safetensors"), load_file(p["view"] / "model.safetensors")
    names = [n for n, t in dev.items() if t.dim() == 2 and ".layers." in n]
    ours, theirs = [], []
    for seed in seeds:
        params = MergeParams(method="della", density=0.5, epsilon=0.15, lam=1.0, rescale="l1", seed=seed)
        a = _ours(p, params, tmp_path / f"ours{seed}")
        b = _theirs(p, params, "float32", tmp_path / f"mk{seed}", seed=seed)
        ours.append([_delta_stats(a[n], dev[n], vox[n]) for n in names])
        theirs.append([_delta_stats(b[n], dev[n], vox[n]) for n in names])
    return torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64)


def test_della_agrees_with_mergekit_statistically(parents, tmp_path: Path) -> None:
    """One seed each, 14 tensors (3k-37k elements): per tensor kept fraction within 0.03 of mergekit's and
    of the density, norm and slope within 10% (single-draw sd is up to ~1.2% for the smallest tensor);
    averaged over tensors, norm and slope ratios within 2%."""
    a, b = _della_stats(parents, tmp_path, range(1))
    a, b = a[0], b[0]
    assert a.shape == (14, 3)
    assert (a[:, 0] - b[:, 0]).abs().max() < 0.03 and (a[:, 0] - 0.5).abs().max() < 0.03
    ratio = a[:, 1:] / b[:, 1:]
    assert (ratio - 1).abs().max() < 0.10
    assert (ratio.mean(0) - 1).abs().max() < 0.02


@pytest.mark.slow
def test_della_agrees_with_mergekit_over_seeds(parents, tmp_path: Path) -> None:
    """20 seeds each: per tensor, the mean of every statistic agrees within 4 standard errors."""
    a, b = _della_stats(parents, tmp_path, range(20))
    se = ((a.var(0) + b.var(0)) / a.shape[0]).sqrt()
    z = (a.mean(0) - b.mean(0)).abs() / se.clamp_min(1e-12)
    assert float(z.max()) < 4.0, z


def test_della_deterministic_per_seed(parents, tmp_path: Path) -> None:
    p = parents["float32"]
    runs = {}
    for tag, seed in (("a", 1), ("b", 1), ("c", 2)):
        runs[tag] = tmp_path / tag / "model.safetensors"
        run_merge(
            MergeJob(
                p["devstral"],
                p["voxtral"],
                tmp_path / tag,
                MergeParams(method="della", seed=seed),
                rope_from="devstral",
                progress=False,
            )
        )
    blob = {k: v.read_bytes() for k, v in runs.items()}
    assert blob["a"] == blob["b"] and blob["a"] != blob["c"]


def test_per_weight_rescale_is_unbiased() -> None:
    """Mean of 2000 per_weight magprune draws -> delta: per element |mean/delta - 1| < 5 sd
    (sd = sqrt((1-p)/p / N) <= 0.027 for p >= 0.4); l1 rescaling, by contrast, is biased per element."""
    delta = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    n = 2000
    acc = torch.zeros_like(delta)
    for i in range(n):
        acc += magprune(delta, 0.5, 0.1, "per_weight", tensor_generator(i, "t"))
    ratio = acc / n / delta
    assert float((ratio - 1).abs().max()) < 5 * (0.6 / 0.4 / n) ** 0.5
    acc.zero_()
    for i in range(200):
        acc += magprune(delta, 0.5, 0.1, "l1", tensor_generator(i, "t"))
    assert float((acc / 200 / delta - 1).abs().max()) > 0.1


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slerp", [plain_slerp.slerp, accel_methods.slerp], ids=["plain", "accel"])
def test_slerp_kernel_matches_mergekit_over_chunks_and_threads(threads: int, dtype: torch.dtype, slerp) -> None:
    """Tensors of 2.5 chunks (1 Mi elements each) at 1-3 intra-op threads, bit for bit: the plain function,
    and the accelerated one whose chunk tasks run single-threaded and reproduce the per-thread split of
    torch's sums (and bf16 runs the fused kernels)."""
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp

    g = torch.Generator().manual_seed(threads)
    a = torch.randn(1280, 2048, generator=g)
    b = (0.6 * a + torch.randn(1280, 2048, generator=g)).to(dtype)
    a = a.to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in (0.1, 0.7):
            theirs = mergekit_slerp(torch.tensor([t]), a[None], b[None])[0]
            ours = slerp(t, a, b)
            assert torch.get_num_threads() == threads  # the kernel pool restores torch's setting
            assert theirs.dtype == ours.dtype == dtype and torch.equal(ours, theirs), f"t={t}"
    finally:
        torch.set_num_threads(before)
