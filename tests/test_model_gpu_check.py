"""tools/gpu_check.py: the FLOP model, argument checks and the timing loop (CPU); the real run is GPU-marked."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import LayerShape, layer_flops_per_token, training_flops_per_token
from megatron_ext.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_flop_model_matches_the_paper_scale_estimate() -> None:
    """FACTS.md section 7: ~266 GFLOP/token at s=131072 for the 40-layer decoder + LM head, 48% attention."""
    shape = LayerShape(layers=40, seq=131072)
    total = training_flops_per_token(shape, vocab=131072)
    assert total / 1e9 == pytest.approx(266, rel=0.01)
    parts = layer_flops_per_token(shape)
    attention_share = 3 * 40 * parts["attention"] / total
    assert attention_share == pytest.approx(0.48, abs=0.01)
    full = layer_flops_per_token(shape, causal=False)["attention"]
    assert full == 2 * parts["attention"]  # causal convention counts half of QK^T and PV


def test_shape_validation() -> None:
    with pytest.raises(ConfigError, match="--heads=30 is not a multiple of --kv-groups=8"):
        LayerShape(heads=30)
    with pytest.raises(ConfigError, match="--seq=0"):
        LayerShape(seq=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_without_gpu_says_so() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/gpu_check.py"), "--layers", "2"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: gpu_check needs a CUDA GPU")
    assert "training GFLOP/token (2 layers, causal): 7.07" in proc.stdout


def test_timing_loop_runs_the_layers_on_cpu() -> None:
    """The same build + forward/backward loop as the GPU run, local spec in fp32 at a tiny width."""
    from benchmarks.gpu_check import build_layers, time_steps
    from megatron_ext.compat.cpu import destroy_distributed, init_distributed

    init_distributed()
    try:
        shape = LayerShape(layers=2, hidden=64, heads=4, kv_groups=2, head_dim=16, ffn=128, seq=32, micro_batch=2)
        model = build_layers(shape, "fp32", backend="local")
        x = torch.randn(shape.seq, shape.micro_batch, shape.hidden, requires_grad=True)
        seconds = time_steps(model, x, steps=2, warmup=1)
        assert seconds > 0 and x.grad is not None and x.grad.abs().sum() > 0
        assert all(p.grad is not None or getattr(p, "main_grad", None) is not None for p in model.parameters())
    finally:
        destroy_distributed()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + Transformer Engine")
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_gpu_check_runs(precision: str) -> None:
    from benchmarks.gpu_check import run_check

    result = run_check(LayerShape(layers=2, seq=8192), precision, steps=3, warmup=2)
    print(result.line())
    assert math.isfinite(result.tflops) and result.tflops > 0 and result.peak_memory_gib > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + Transformer Engine")
def test_te_spec_matches_hf_on_tiny_voxtral(tiny_dir: Path) -> None:
    """TE spec (fp32, one GPU) builds the same checkpoint layout and matches HF on audio + text."""
    import transformers
    from safetensors.torch import load_file

    from megatron_ext.checkpoint import mapping
    from megatron_ext.compat.cpu import destroy_distributed, init_distributed
    from megatron_ext.models.build import BuildConfig, build_model
    from megatron_ext.models.loading import load_full_tensors
    from megatron_ext.testing.tiny_models import VOXTRAL

    init_distributed()
    try:
        hf_weights = load_file(str(tiny_dir / "voxtral-hf" / "model.safetensors"))
        model = build_model(VOXTRAL, BuildConfig(backend="te", init_weights=False)).cuda()
        assert model.backend == "te"
        load_full_tensors(model, mapping.megatron_getter(VOXTRAL, hf_weights.__getitem__))
        hf = (
            transformers.VoxtralForConditionalGeneration.from_pretrained(tiny_dir / "voxtral-hf", dtype=torch.float32)
            .cuda()
            .eval()
        )
        ids = torch.tensor([[1, 3, 25] + [24] * 375 + [4, 1100, 1200]], device="cuda")
        features = torch.randn(1, 128, 3000, generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad():
            ours = model.eval()(ids, torch.arange(ids.shape[1], device="cuda")[None], audio_features=features)
            ref = hf(input_ids=ids, input_features=features).logits
        diff = (ours - ref).abs().max().item()
        print(f"TE spec vs HF max_abs_diff={diff:.3e}")
        # TE runs fp32 GEMMs in TF32 unless NVIDIA_TF32_OVERRIDE=0 (set by `make test-gpu`); H200: 4.6e-6 without
        # TF32, 5.2e-3 with it.
        assert diff < (1e-4 if os.environ.get("NVIDIA_TF32_OVERRIDE") == "0" else 2e-2)
    finally:
        destroy_distributed()
