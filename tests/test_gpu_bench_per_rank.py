"""`tools/sft_gpu_bench.py --per-rank-tp`: the TP-rank slice, the communication model and the 128-GPU projection,
checked on CPU (the plan at the real shapes; the measured path with tiny shapes, fp32, local spec)."""

from __future__ import annotations

import json

import pytest
import torch
from tool_scripts import tool_main

from benchmarks.sft_per_rank import CommModel, per_rank, tiny_decoder, tp_rank_slice
from megatron_ext.training.metrics import step_flops


def test_plan_holds_one_tp4_rank_of_mistral_small(capsys) -> None:
    """--check at the real shapes: 8 q / 2 KV heads, ffn 8192, vocab 32768, hidden 5120; 1 GB per collective."""
    assert tool_main("sft_gpu_bench")(["--per-rank-tp", "4", "--check"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["rank_shapes"] == {
        "layers": 8,
        "hidden": 5120,
        "query_heads": 8,
        "kv_heads": 2,
        "ffn": 8192,
        "vocab": 32768,
    }
    assert plan["tokens_per_step"] == 131072
    comm = plan["comm_model"]
    assert comm["tp_bytes_per_collective_per_gpu"] == 131072 * 5120 * 2 * 3 / 4  # bf16 [s, h], ring of 4
    # 40 layers x 12 + embedding 2 over s + loss 2 over the 65536 supervised tokens, over 360 GB/s
    expected = (40 * 12 * 131072 + 2 * 131072 + 2 * 65536) * 5120 * 2 * 0.75 / 360e9
    assert comm["tp_s_per_sequence_40_layers"] == pytest.approx(expected, rel=1e-12)
    # ~6B parameters per TP rank (24B / 4) x 6 bytes x 31/32 over DP
    assert 33e9 < comm["dp_bytes_per_step_per_gpu"] < 36e9


def test_bad_layouts_and_missing_cuda_are_one_line_errors(capsys) -> None:
    main = tool_main("sft_gpu_bench")
    assert main(["--per-rank-tp", "3"]) == 2
    assert "--per-rank-tp 3: needs --gpus (128) divisible by it" in capsys.readouterr().err
    assert main(["--per-rank-tp", "4", "--global-batch", "30"]) == 2
    assert main(["--cpu-dry-run"]) == 2 and "needs --per-rank-tp" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--per-rank-tp", "4"]) == 2 and "needs CUDA" in capsys.readouterr().err


def test_cpu_dry_run_measures_and_projects() -> None:
    """The measured path end to end on a tiny TP-4 slice (2 steps); the projection adds the modelled
    communication to the FLOP-scaled compute, and its throughput follows from its step time."""
    result = per_rank(tp=4, layers=2, seq_length=512, docs=2, steps=1, warmup=1, cpu=True)
    flops = {n: step_flops(tp_rank_slice(tiny_decoder(), 4, n), [256, 256], 256, 0) for n in (2, 40)}
    assert result["plan"]["rank_shapes"]["query_heads"] == 2 and result["plan"]["rank_shapes"]["vocab"] == 256
    for name in ("bf16", "fp8_tensorwise"):
        measured, proj = result[name], result[name]["projection"]
        assert measured["backend"] == "local" and measured["step_s"] > 0 and measured["model_tflops"] > 0
        assert proj["dp"] == 32 and proj["sequences_per_step"] == 32
        scaled = measured["step_s"] * flops[40] / flops[2]  # 40 layers from 2, at the measured TFLOP/s
        assert proj["compute_s_per_sequence"] == pytest.approx(scaled, rel=1e-9)
        step = proj["compute_s_per_sequence"] + proj["tp_comm_s_per_sequence"] + proj["dp_comm_s"]
        assert proj["step_s"] == pytest.approx(step, rel=1e-12)
        assert proj["tokens_per_s"] == pytest.approx(32 * 512 / proj["step_s"], rel=1e-12)


def test_comm_model_scales_with_ranks_and_recompute() -> None:
    comm = CommModel(nvlink_gbs=100.0, network_gbs=10.0)
    assert comm.tp_seconds(1, 1000, 0, 64, 2, recompute=True) == 0.0  # nothing to gather at TP=1
    base = comm.tp_seconds(2, 1000, 0, 64, 2, recompute=False)
    assert base == pytest.approx((2 * 8 * 1000 + 2 * 1000) * 64 * 2 * 0.5 / 100e9, rel=1e-12)
    assert comm.tp_seconds(2, 1000, 0, 64, 2, recompute=True) > base
    assert comm.dp_seconds(1, 1e9) == 0.0 and comm.dp_seconds(2, 1e9) == pytest.approx(0.3, rel=1e-12)
