"""`tools/cp_gpu_check.py`, the GPU tier's CP=2 chunk-distribution check: its plan at the real shapes, its path on
CPU with tiny shapes (each rank's embeddings equal its CP=1 slice exactly), its one-line refusals; the GPU run
itself is marked `gpu`."""

from __future__ import annotations

import json

import pytest
import torch
from tool_scripts import tool_main


def test_plan_spreads_the_chunks_over_the_cp_ranks(capsys) -> None:
    assert tool_main("cp_gpu_check")(["--check"]) == 0
    plan = json.loads(capsys.readouterr().out)
    ranks = plan["ranks"]
    assert [r["positions"] for r in ranks] == [65536, 65536]
    assert sum(r["audio_positions"] for r in ranks) == 16 * 375
    held = [set(r["chunks"]) for r in ranks]
    assert held[0] | held[1] == set(range(16)) and held[0] != held[1]  # all chunks encoded, not all by each rank
    assert plan["straddling_chunks"] and set(plan["straddling_chunks"]) == held[0] & held[1]


def test_cpu_dry_run_matches_cp1(capsys) -> None:
    main = tool_main("cp_gpu_check")
    assert main(["--cpu-dry-run", "--seq-length", "2048", "--docs", "2", "--chunks", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["max_abs_vs_cp1"] for r in out["ranks"]] == [0.0, 0.0]
    assert [r["chunks"] for r in out["ranks"]] == [len(r["chunks"]) for r in out["plan"]["ranks"]]


def test_bad_inputs_are_one_line_errors(capsys) -> None:
    main = tool_main("cp_gpu_check")
    assert main(["--check", "--seq-length", "1001"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --seq-length 1001: needs a multiple of 2 x cp = 4") and err.count("\n") == 1
    assert main(["--cp", "0"]) == 2 and "--cp 0: must be >= 1" in capsys.readouterr().err
    assert main(["--check", "--docs", "1", "--seq-length", "4096", "--chunks", "9"]) == 2
    assert "9 audio chunks per document do not fit" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([]) == 2 and "needs CUDA" in capsys.readouterr().err


@pytest.mark.gpu
def test_cp2_chunk_distribution_on_one_gpu(capsys) -> None:
    assert tool_main("cp_gpu_check")([]) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(r["te_index_equal"] for r in out["ranks"])
