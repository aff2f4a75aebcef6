"""SIGKILL inside a merge's write window (after its partial directory appears): nothing loaders accept is
left behind, and a re-run completes (adopting the partial and resuming finished shards) with bytes identical
to an uninterrupted merge, for multi-shard and single-shard outputs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.synthetic import write_pair
from megatron_ext.config import DecoderConfig, EncoderConfig
from megatron_ext.merge.methods import MergeParams
from megatron_ext.merge.run import MergeJob, run_merge

ROOT = Path(__file__).resolve().parents[1]
# ~25 M parameters per parent (fp32, ~100 MB): the merge itself takes about a second, in ~25 shards.
DECODER = DecoderConfig(
    num_layers=4,
    hidden_size=512,
    ffn_hidden_size=2048,
    num_attention_heads=8,
    num_query_groups=2,
    kv_channels=64,
    vocab_size=8192,
)
ENCODER = EncoderConfig(num_layers=1, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_pair(tmp_path_factory.mktemp("fault_parents"), DECODER, ENCODER, dtype=torch.float32)


def _cmd(pair: tuple[Path, Path], out: Path, method: str, shard_gb: float) -> list:
    return [
        sys.executable,
        ROOT / "tools/merge.py",
        "--devstral",
        pair[0],
        "--voxtral",
        pair[1],
        "--output",
        out,
        "--method",
        method,
        "--alpha",
        "0.3",
        "--rope-from",
        "devstral",
        "--shard-size-gb",
        str(shard_gb),
        "--no-progress",
    ]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _loadable(d: Path) -> bool:
    """What an HF loader needs: config.json plus every shard the index (or the single file) names."""
    if not (d / "config.json").is_file():
        return False
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return all((d / f).is_file() for f in set(json.loads(index.read_text())["weight_map"].values()))
    return (d / "model.safetensors").is_file()


def _in_process(pair: tuple[Path, Path], out: Path, method: str, shard_gb: float) -> float:
    """The same merge as the CLI command, run in this process; returns its wall time."""
    t0 = time.time()
    run_merge(
        MergeJob(
            pair[0],
            pair[1],
            out,
            MergeParams(method=method, alpha=0.3),
            rope_from="devstral",
            shard_bytes=int(shard_gb * 1024**3),
            progress=False,
        )
    )
    return time.time() - t0


def _kill_runs(pair: tuple[Path, Path], tmp: Path, runs: int, method: str, shard_gb: float = 0.004) -> None:
    """Kill the CLI at a random point after its partial output appears, check, re-run (in process)."""
    ref = tmp / "ref"
    duration = _in_process(pair, ref, method, shard_gb)
    reference = _files(ref)
    shards = sum(1 for n in reference if n.endswith(".safetensors"))
    assert shards > 10 if shard_gb < 0.01 else shards == 1
    rng = random.Random(1234)
    mid_merge = 0
    for k in range(runs):
        out = tmp / f"out{k}"
        proc = subprocess.Popen(_cmd(pair, out, method, shard_gb), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not _partials(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.2 * duration))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not out.exists() or _files(out) == reference  # killed after the final rename: complete
        if _partials(out):
            mid_merge += 1
            assert not out.exists(), f"run {k}: the partial directory outlived the final rename"
            assert not any(_loadable(p) for p in _partials(out)), f"run {k}: a killed merge left a loadable directory"
        _in_process(pair, out, method, shard_gb)
        assert _files(out) == reference, f"run {k}: re-run after SIGKILL differs from an uninterrupted merge"
        assert not _partials(out)
    assert mid_merge >= 1  # at least one kill landed mid-merge


def _partials(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.partial-*"))


def test_sigkill_quick(pair: tuple[Path, Path], tmp_path: Path) -> None:
    _kill_runs(pair, tmp_path, 3, "linear")


def test_sigkill_single_shard_quick(pair: tuple[Path, Path], tmp_path: Path) -> None:
    _kill_runs(pair, tmp_path, 2, "linear", shard_gb=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "della"])
def test_sigkill_many(pair: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    _kill_runs(pair, tmp_path, 10, method)
