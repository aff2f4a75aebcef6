"""Converted torch_dist checkpoints load into Megatron-Core at TP=1 and TP=2 and reproduce HF's logits.

The tiny Devstral (HF MistralForCausalLM) goes HF -> torch_dist with the converter; a Megatron-Core
GPTModel (local spec, gloo) loads it through `sharded_state_dict(prefix="language_model.")` +
`dist_checkpointing.load` with StrictHandling.RAISE_ALL (no missing or unexpected key). Tolerance: max
|logit difference| <= 1e-5 in fp32. At TP=2 the model is re-saved by Megatron itself (two chunks per
TP-split tensor) and our streaming reader must return the original full tensors from it.
The project's AudioLanguageModel (Voxtral with a spliced audio chunk; Devstral-2 with YaRN and llama-4
query scaling) loads the converted checkpoints the same way, strictly, at TP=1 and (Voxtral) TP=2, where
Megatron's own TP=2 re-save is read back by our reader. The plain-GPTModel variants are in the slow tier.
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


@pytest.mark.slow
def test_tp1_load_matches_hf_logits(devstral_ckpt: Path, tiny_dir: Path) -> None:
    init_distributed(tp=1, pp=1)
    try:
        diff = worker.max_logit_diff(devstral_ckpt, tiny_dir / "devstral-hf")
    finally:
        destroy_distributed()
    assert diff <= TOL, diff


@pytest.mark.slow
def test_tp2_load_matches_hf_logits_and_megatron_resave_reads_back(
    devstral_ckpt: Path, tiny_dir: Path, tmp_path: Path
) -> None:
    resave = tmp_path / "resaved-tp2"
    diff = _torchrun2("gpt", str(devstral_ckpt), str(tiny_dir / "devstral-hf"), "2", str(resave))
    assert diff <= TOL, diff
    ours, megatrons = TorchDistReader(devstral_ckpt), TorchDistReader(resave)
    assert sorted(ours.names()) == sorted(megatrons.names())
    for name in ours.names():
        assert torch.equal(ours.get(name), megatrons.get(name)), name


@pytest.mark.slow
def test_pp2_stages_load_their_layers_from_a_pp2_conversion(tiny_dir: Path, tmp_path: Path) -> None:
    """Megatron-Core at PP=2 loads each stage's part strictly; every tensor equals the checkpoint's."""
    ckpt = tmp_path / "devstral-pp2"
    convert(tiny_dir / "devstral-hf", ckpt, "megatron", pp=2, progress=False)
    out = _run_torchrun2("pp", str(ckpt))
    stages = sorted(line.split()[1:] for line in out.splitlines() if line.startswith("STAGE"))
    assert stages == [["0", "first", "-", "0"], ["1", "-", "last", "1"]], out


def _run_torchrun2(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(ROOT / "tests" / "convert_megatron_worker.py"),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _torchrun2(*args: str) -> float:
    out = _run_torchrun2(*args)
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("MAXDIFF")))


@pytest.fixture(scope="module")
def audio_lm_ckpts(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("audio_lm")
    for model in ("voxtral", "devstral2"):
        convert(tiny_dir / f"{model}-hf", out / model, "megatron", tp=2, progress=False)
    return {m: out / m for m in ("voxtral", "devstral2")}


@pytest.mark.parametrize("model", ["voxtral", "devstral2"])
def test_audio_lm_tp1_loads_strictly_and_matches_hf_logits(model: str, audio_lm_ckpts: dict[str, Path]) -> None:
    init_distributed(tp=1, pp=1)
    try:
        diff = worker.audio_lm_logit_diff(audio_lm_ckpts[model])
    finally:
        destroy_distributed()
    assert diff <= TOL, diff


# Published-layout parent -> torch_dist; transformers reads the HF layout of the same weights itself.
PUBLISHED = {
    "devstral2-hf": ("Mistral3ForConditionalGeneration", "devstral2-hf"),
    "devstral2-native": ("Mistral3ForConditionalGeneration", "devstral2-hf"),
    "voxtral-hf-sharded": ("VoxtralForConditionalGeneration", "voxtral-hf-sharded"),
    "voxtral-native": ("VoxtralForConditionalGeneration", "voxtral-hf"),
    "devstral2507-hf": ("MistralForCausalLM", "devstral2507-hf"),
    "devstral2507-native": ("MistralForCausalLM", "devstral2507-hf"),
}


@pytest.mark.parametrize("parent", sorted(PUBLISHED))
def test_published_parent_converts_and_matches_transformers(parent: str, tiny_dir: Path, tmp_path: Path) -> None:
    """Devstral 2 past its original context (40 tokens > 32: YaRN + llama-4 scaling), FP8 dequantised."""
    convert(tiny_dir / parent, tmp_path / "td", "megatron", progress=False)
    cls, reference = PUBLISHED[parent]
    init_distributed(tp=1, pp=1)
    try:
        diff = worker.audio_lm_logit_diff(tmp_path / "td", published=(cls, tiny_dir / reference))
    finally:
        destroy_distributed()
    assert diff <= TOL, diff


def test_audio_lm_voxtral_tp2_matches_hf_logits_and_megatron_resave_reads_back(
    audio_lm_ckpts: dict[str, Path], tmp_path: Path
) -> None:
    resave = tmp_path / "resaved-tp2"
    assert _torchrun2("audio_lm", str(audio_lm_ckpts["voxtral"]), "2", str(resave)) <= TOL
    ours, megatrons = TorchDistReader(audio_lm_ckpts["voxtral"]), TorchDistReader(resave)
    assert sorted(ours.names()) == sorted(megatrons.names())
    for name in ours.names():
        assert torch.equal(ours.get(name), megatrons.get(name)), name
