"""The trained parents reach their targets on held-out data (issue 20), each clearly better at its own task.

Slow: builds (or reuses, by cache key) build/miniature/parents, several minutes on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_ext.miniature.parents import build_parents

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_parents_learn_their_own_task() -> None:
    scores = build_parents(ROOT / "build" / "miniature" / "parents")["scores"]
    vox, dev = scores["voxtral"], scores["devstral"]
    assert vox["wer"] <= 0.25, scores
    assert dev["tool_call_exact_match"] >= 0.90, scores
    assert dev["tool_call_exact_match"] - vox["tool_call_exact_match"] >= 0.5, scores  # clearly worse elsewhere
