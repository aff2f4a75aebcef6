"""The README's memory/throughput model of the 128k step per layout (issue 22): its table is what
`benchmarks/layout_model.py` computes, and the TP4-CP1 column reproduces the README's and FACTS' TP4 figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.layout_model import Layout, memory_gb, step_seconds, table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_the_models() -> None:
    readme = "\n".join(line.strip() for line in README.read_text().splitlines())
    assert table() in readme


def test_tp4_cp1_column_matches_the_stated_estimate() -> None:
    tp4 = memory_gb(Layout(4))
    assert tp4["weights_and_grads"] + tp4["optimizer"] == pytest.approx(37.7, abs=0.1)  # FACTS: ~37.7 GB of states
    assert tp4["checkpointed_activations"] == pytest.approx(13.4, abs=0.1)  # FACTS: ~0.34 GB/layer x 40
    assert tp4["total"] == pytest.approx(62, abs=1)  # README: ~62 GB
    assert step_seconds(Layout(4))["tp_comm"] == pytest.approx(1.35, abs=0.01)  # CommModel: 1.35 s per sequence
    cp2, tp8 = memory_gb(Layout(4, 2)), memory_gb(Layout(8, 1, "replicate"))
    assert cp2["checkpointed_activations"] == pytest.approx(tp4["checkpointed_activations"] / 2)
    assert tp8["encoder"] == pytest.approx(4 * tp4["encoder"])  # whole encoder on every rank
    assert tp8["total"] < cp2["total"] < tp4["total"]
