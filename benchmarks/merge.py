"""Merge benchmark: our linear/SLERP/DELLA vs mergekit on one synthetic pair with Mistral-Small tensor shapes,
and vs the disk floor (read both inputs + write the output once). Each measurement runs in a fresh child
process that reports its own wall time (work only, interpreter start excluded) and peak RSS (VmHWM);
every kind is measured once per round for `repeat` rounds, each run after a `sync` and a read of its
inputs (warm page cache for every kind alike: the host pages cold files out), and its fastest run is
reported (shared-machine noise is one-sided). A second, larger pair checks that our peak RSS stays flat
in model size. DELLA (density 0.5, epsilon 0.1, lambda 1, l1 rescale; deltas against Devstral) merges whole
tensors in float32 on both sides, so its peak RSS is several times the largest tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.convert import peak_rss_gb
from benchmarks.synthetic import write_mistral_view, write_pair
from megatron_ext.checkpoint.direct_io import DirectWriter, aligned_empty
from megatron_ext.config import EncoderConfig, mistral_small_decoder
from megatron_ext.merge.methods import MergeParams
from megatron_ext.merge.run import MergeJob, run_merge

GB = 1024**3


METHODS = ("linear", "slerp", "della")
SMALL_ENCODER = EncoderConfig(num_layers=1, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4)


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*.safetensors"))


def read_all(dirs: list[Path], view: memoryview) -> None:
    """Read every safetensors file under `dirs` once, through `view`."""
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass


def disk_floor(inputs: list[Path], out: Path, out_bytes: int, block: int = 64 * 1024 * 1024) -> None:
    """Read every input safetensors file once and write `out_bytes` to `out`, in 64 MiB blocks. The
    writes bypass the page cache where the filesystem allows (as the merge's do): on the 2-core VM that
    is the faster way to write (3.5 GB in 1.8-1.9 s against 3.8-4.4 s buffered), so the floor is lower."""
    view = memoryview(aligned_empty(block).numpy())
    read_all(inputs, view)
    out.mkdir(parents=True, exist_ok=True)
    with DirectWriter(out / "floor.bin") as fh:
        left = out_bytes
        while left > 0:
            left -= fh.write(view[: min(block, left)])


def child(kind: str, root: Path) -> dict[str, Any]:
    """Run one measurement in this process (called in a fresh child)."""
    dev, vox, view, out = root / "devstral", root / "voxtral", root / "view", root / "out"
    t0 = time.time()
    if kind == "floor":
        disk_floor([dev, vox], out, _dir_bytes(vox))
    elif kind.startswith("ours-"):
        run_merge(
            MergeJob(
                dev,
                vox,
                out,
                MergeParams(method=kind.removeprefix("ours-"), alpha=0.1),
                rope_from="devstral",
                progress=False,
            )
        )
    elif kind.startswith("mergekit-"):
        from megatron_ext.testing.mergekit_reference import mergekit_config, run_mergekit

        params = MergeParams(method=kind.removeprefix("mergekit-"), alpha=0.1)
        run_mergekit(mergekit_config(params, dev, view, "bfloat16"), out)
    else:
        raise ValueError(kind)
    wall = time.time() - t0
    return {"kind": kind, "wall_s": wall, "peak_rss_gb": peak_rss_gb() * 1e9 / GB}


def _run_once(kind: str, root: Path, tool: Path) -> dict[str, Any]:
    """One measurement in a fresh child, after a `sync` and a warming read of its inputs."""
    inputs = [root / "devstral", root / ("view" if kind.startswith("mergekit") else "voxtral")]
    shutil.rmtree(root / "out", ignore_errors=True)
    os.sync()  # every run starts with no dirty pages from the one before
    read_all(inputs, memoryview(bytearray(64 * 1024 * 1024)))  # warm: the host may page cold files out
    cmd = [sys.executable, str(tool), "--child", kind, "--dir", str(root)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(root / "out", ignore_errors=True)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _measure(kinds: list[str], root: Path, tool: Path, repeat: int) -> dict[str, dict[str, Any]]:
    """`repeat` rounds, each running every kind once (interleaved: a slow spell of the machine hits all
    kinds alike); per kind the fastest wall time and the largest peak RSS."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for _ in range(repeat):
        for kind in kinds:
            runs[kind].append(_run_once(kind, root, tool))
    results = {}
    for kind, rs in runs.items():
        walls = [r["wall_s"] for r in rs]
        rss = max(r["peak_rss_gb"] for r in rs)
        results[kind] = {"kind": kind, "wall_s": min(walls), "walls_s": walls, "peak_rss_gb": rss}
        print(
            f"  {kind:16s} wall {min(walls):7.1f} s (runs: {', '.join(f'{w:.1f}' for w in walls)})   "
            f"peak RSS {rss:5.2f} GB",
            flush=True,
        )
    return results


def run_benchmark(
    root: Path,
    layers: int,
    big_layers: int,
    tool: Path,
    keep: bool = False,
    repeat: int = 2,
    methods: tuple[str, ...] = METHODS,
) -> dict[str, Any]:
    """Generate the pairs under `root`, measure `methods` (ours and mergekit's), print ratios; deletes
    generated data unless `keep`."""
    results: dict[str, Any] = {"cpu_count": os.cpu_count(), "layers": layers, "repeat": repeat}
    try:
        for n_layers, kinds in (
            (layers, ["floor", *(f"{side}-{m}" for m in methods for side in ("ours", "mergekit"))]),
            (big_layers, ["ours-linear"]),
        ):
            d = root / f"pair{n_layers}"
            t0 = time.time()
            dev, vox = write_pair(d, mistral_small_decoder(n_layers), SMALL_ENCODER, torch.bfloat16, fast=True)
            if any(k.startswith("mergekit") for k in kinds):
                write_mistral_view(vox, dev, d / "view")
            size = _dir_bytes(dev)
            print(
                f"pair with {n_layers} layer(s): {size / GB:.2f} GB per parent (bf16), generated in "
                f"{time.time() - t0:.0f} s",
                flush=True,
            )
            results[f"layers{n_layers}"] = {"parent_gb": size / GB, **_measure(kinds, d, tool, repeat)}
            shutil.rmtree(d)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    small, big = results[f"layers{layers}"], results[f"layers{big_layers}"]
    largest = 131072 * 5120 * 2 / GB
    ratios = {f"{m}_vs_mergekit": small[f"ours-{m}"]["wall_s"] / small[f"mergekit-{m}"]["wall_s"] for m in methods}
    ratios |= {f"{m}_vs_floor": small[f"ours-{m}"]["wall_s"] / small["floor"]["wall_s"] for m in methods}
    ratios |= {
        "rss_budget_gb": 2 + 3 * largest,
        "rss_growth_gb": big["ours-linear"]["peak_rss_gb"] - small["ours-linear"]["peak_rss_gb"],
    }
    results["ratios"] = ratios

    mk = ", ".join(f"{m} {ratios[f'{m}_vs_mergekit']:.2f}x" for m in methods)
    floor = ", ".join(f"{m} {ratios[f'{m}_vs_floor']:.2f}x" for m in methods)
    print(f"ours/mergekit wall: {mk} (linear, SLERP goal <= 0.5x)")
    print(f"ours/disk floor wall: {floor} (linear, SLERP goal <= 1.5x)")
    rss = ", ".join(f"{m} {small[f'ours-{m}']['peak_rss_gb']:.2f}" for m in methods)
    rss_mk = ", ".join(f"{m} {small[f'mergekit-{m}']['peak_rss_gb']:.2f}" for m in methods)
    print(
        f"peak RSS budget 2 GB + 3 x largest tensor ({largest:.2f} GB) = {ratios['rss_budget_gb']:.2f} GB; ours: "
        f"{rss} GB (mergekit: {rss_mk} GB); growth {layers}->{big_layers} layers "
        f"({big['parent_gb'] - small['parent_gb']:.1f} GB more per parent): {ratios['rss_growth_gb']:+.2f} GB"
    )
    return results
