"""Converted torch_dist checkpoints load into Megatron-Core at TP=1 and TP=2 and reproduce HF's logits.

The tiny Devstral (HF MistralForCausalLM) goes HF -> torch_dist with tools' library code; a Megatron-Core
GPTModel (local spec, gloo) loads it through `sharded_state_dict(prefix="language_model.")` +
`dist_checkpointing.load` with StrictHandling.RAISE_ALL (no missing or unexpected key). Tolerance: max
|logit difference| <= 1e-5 in fp32. At TP=2 the model is re-saved by Megatron itself (two chunks per
TP-split tensor) and our streaming reader must return the original full tensors from it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.checkpoint.convert import convert
from megatron_ext.checkpoint.torch_dist_io import TorchDistReader
from megatron_ext.compat.cpu import cpu_only, destroy_distributed, init_distributed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

import convert_megatron_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_only(), reason="CPU (gloo) variant; the GPU tier covers CUDA")
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def devstral_ckpt(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("megatron") / "devstral-td"
    convert(tiny_dir / "devstral-hf", out, "megatron", tp=2, progress=False)
    return out


def test_tp1_load_matches_hf_logits(devstral_ckpt: Path, tiny_dir: Path) -> None:
    init_distributed(tp=1, pp=1)
    try:
        diff = worker.max_logit_diff(devstral_ckpt, tiny_dir / "devstral-hf")
    finally:
        destroy_distributed()
    assert diff <= TOL, diff


def test_tp2_load_matches_hf_logits_and_megatron_resave_reads_back(devstral_ckpt: Path, tiny_dir: Path,
                                                                     tmp_path: Path) -> None:
    resave = tmp_path / "resaved-tp2"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(ROOT / "tests" / "convert_megatron_worker.py"), str(devstral_ckpt), str(tiny_dir / "devstral-hf"), "2",
         str(resave)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = float(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("MAXDIFF")))
    assert diff <= TOL, diff
    ours, megatrons = TorchDistReader(devstral_ckpt), TorchDistReader(resave)
    assert sorted(ours.names()) == sorted(megatrons.names())
    for name in ours.names():
        assert torch.equal(ours.get(name), megatrons.get(name)), name
