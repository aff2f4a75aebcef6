"""Merge benchmark: our linear/SLERP/DELLA vs mergekit on one synthetic pair with Mistral-Small tensor shapes,
and vs the disk floor (read both inputs + write the output once). Each measurement runs in a fresh child
process that reports its own wall time (work only, interpreter start excluded) and peak RSS (VmHWM);
every kind is measured once per round for `repeat` rounds, each run after a `sync` and a read of its
inputs (warm page cache for every kind alike: the host pages cold files out), and its fastest run is
reported (shared-machine noise is one-sided). A second, larger pair checks that our peak RSS stays flat
in model size. DELLA (density 0.5, epsilon 0.1, lambda 1, l1 rescale; deltas against Devstral) runs on a
third pair with a smaller vocabulary (`DELLA_VOCAB`), with its own disk floor.
"""

from __future__ import annotations

import dataclasses
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
from megatron_ext.config import DecoderConfig, EncoderConfig, mistral_small_decoder
from megatron_ext.merge.methods import MergeParams
from megatron_ext.merge.run import MergeJob, run_merge

GB = 1024**3


METHODS = ("linear", "slerp", "della")
# DELLA merges whole tensors in float32 (ours and mergekit's): on the 131k-row embedding that is 14 GB and
# over 19 GB of peak RSS, so it runs on a pair whose largest tensors are the 32768 x 5120 MLP matrices.
DELLA_VOCAB = 32768
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


def _pairs(layers: int, big_layers: int, methods: tuple[str, ...]) -> list[tuple[str, DecoderConfig, list[str]]]:
    """(label, decoder, kinds) per generated pair: linear and SLERP on the main pair, linear again on the
    bigger one (RSS flatness), DELLA on its own pair with a 32k vocabulary (`DELLA_VOCAB`)."""
    sides = ("ours", "mergekit")
    pairs = []
    main = [f"{side}-{m}" for m in methods if m != "della" for side in sides]
    if main:
        pairs.append(("main", mistral_small_decoder(layers), ["floor", *main]))
    if "linear" in methods:
        pairs.append(("big", mistral_small_decoder(big_layers), ["ours-linear"]))
    if "della" in methods:
        della = dataclasses.replace(mistral_small_decoder(layers), vocab_size=DELLA_VOCAB)
        pairs.append(("della", della, ["floor", *(f"{side}-della" for side in sides)]))
    return pairs


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
        for label, decoder, kinds in _pairs(layers, big_layers, methods):
            d = root / label
            t0 = time.time()
            dev, vox = write_pair(d, decoder, SMALL_ENCODER, torch.bfloat16, fast=True)
            if any(k.startswith("mergekit") for k in kinds):
                write_mistral_view(vox, dev, d / "view")
            size = _dir_bytes(dev)
            print(
                f"{label} pair, {decoder.num_layers} layer(s), vocab {decoder.vocab_size}: {size / GB:.2f} GB per "
                f"parent (bf16), generated in {time.time() - t0:.0f} s",
                flush=True,
            )
            results[label] = {"parent_gb": size / GB, **_measure(kinds, d, tool, repeat)}
            shutil.rmtree(d)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)

    def pair(m: str) -> dict[str, Any]:
        """The results of the pair method `m` ran on."""
        return results["della" if m == "della" else "main"]

    ratios: dict[str, float] = {}
    for m in methods:
        ratios[f"{m}_vs_mergekit"] = pair(m)[f"ours-{m}"]["wall_s"] / pair(m)[f"mergekit-{m}"]["wall_s"]
        ratios[f"{m}_vs_floor"] = pair(m)[f"ours-{m}"]["wall_s"] / pair(m)["floor"]["wall_s"]
    results["ratios"] = ratios
    mk = ", ".join(f"{m} {ratios[f'{m}_vs_mergekit']:.2f}x" for m in methods)
    floor = ", ".join(f"{m} {ratios[f'{m}_vs_floor']:.2f}x" for m in methods)
    print(f"ours/mergekit wall: {mk} (linear, SLERP goal <= 0.5x)")
    print(f"ours/disk floor wall: {floor} (linear, SLERP goal <= 1.5x; DELLA against its own pair's floor)")
    rss = ", ".join(f"{m} {pair(m)[f'ours-{m}']['peak_rss_gb']:.2f}" for m in methods)
    rss_mk = ", ".join(f"{m} {pair(m)[f'mergekit-{m}']['peak_rss_gb']:.2f}" for m in methods)
    print(f"peak RSS: ours {rss} GB; mergekit {rss_mk} GB")
    if "linear" in methods:
        small, big = results["main"], results["big"]
        largest = 131072 * 5120 * 2 / GB
        ratios["rss_budget_gb"] = 2 + 3 * largest
        ratios["rss_growth_gb"] = big["ours-linear"]["peak_rss_gb"] - small["ours-linear"]["peak_rss_gb"]
        print(
            f"peak RSS budget 2 GB + 3 x largest tensor ({largest:.2f} GB) = {ratios['rss_budget_gb']:.2f} GB; "
            f"growth {layers}->{big_layers} layers ({big['parent_gb'] - small['parent_gb']:.1f} GB more per "
            f"parent): {ratios['rss_growth_gb']:+.2f} GB"
        )
    return results
