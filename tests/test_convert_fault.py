"""SIGKILL at random points never leaves a directory that loaders accept; a re-run completes.

The converter runs as a child process on a ~125 MB synthetic checkpoint and is killed either at a
random time since start (imports, reading, writing) or at a random time after its hidden partial
output appeared (mid-write). After each kill the output either does not exist or is a complete,
verifiable checkpoint; the partial sibling is refused by `read_meta`. Finally a re-run removes the
stale partials and produces a checkpoint whose tensors equal the source's and whose files are byte for
byte those of an uninterrupted conversion.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.convert import write_synthetic_hf
from megatron_ext.checkpoint import mapping
from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.convert import convert
from megatron_ext.checkpoint.metadata import read_meta
from megatron_ext.checkpoint.source import open_checkpoint
from megatron_ext.checkpoint.torch_dist_io import TorchDistReader
from megatron_ext.config import DecoderConfig, ModelConfig, RopeConfig

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(
    DecoderConfig(
        num_layers=4,
        hidden_size=512,
        ffn_hidden_size=2048,
        num_attention_heads=8,
        num_query_groups=2,
        kv_channels=64,
        vocab_size=16384,
        rope=RopeConfig(1e8),
    )
)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("fault") / "hf"
    write_synthetic_hf(src, CFG, dtype=torch.float32, max_shard_bytes=40 << 20)
    return src


def _kill_runs(source: Path, out: Path, kills: int, seed: int) -> int:
    """Kill the converter `kills` times; returns how many kills hit while the partial output existed."""
    rng = random.Random(seed)
    mid_write = 0
    for k in range(kills):
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tools" / "convert.py"),
                "--input",
                str(source),
                "--output",
                str(out),
                "--to",
                "megatron",
                "--no-progress",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if k % 2 == 0:
            time.sleep(rng.uniform(0.0, 8.0))
        else:
            deadline = time.monotonic() + 60
            while not list(out.parent.glob(f".{out.name}.partial-*")) and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.05))  # the write of ~125 MB takes longer, even on an idle machine
        partials = list(out.parent.glob(f".{out.name}.partial-*"))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mid_write += bool(partials) and not out.exists()
        if out.exists():  # it finished before the kill: must be complete and readable
            meta = read_meta(out)
            assert sorted(TorchDistReader(out).names()) == sorted(mapping.megatron_names(meta.model))
            shutil.rmtree(out)
        for p in out.parent.glob(f".{out.name}.partial-*"):
            with pytest.raises(CheckpointError):
                read_meta(p)
    return mid_write


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _rerun_and_verify(source: Path, out: Path) -> None:
    convert(source, out, "megatron", progress=False)
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    read_meta(out)
    inp, reader = open_checkpoint(source), TorchDistReader(out)
    for name, t in mapping.hf_to_megatron(CFG, inp.get):
        assert torch.equal(reader.get(name), t), name
    reference = out.with_name("uninterrupted")
    convert(source, reference, "megatron", progress=False)
    assert _files(out) == _files(reference)


def test_three_kills_then_rerun(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _kill_runs(source, out, kills=3, seed=1) >= 1
    _rerun_and_verify(source, out)


@pytest.mark.slow
def test_twelve_random_kills_then_rerun(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _kill_runs(source, out, kills=12, seed=2) >= 3
    _rerun_and_verify(source, out)
