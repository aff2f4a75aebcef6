"""The merge grid: `examples/merge_grid.yaml` is exactly the paper's Table 1 (8 DELLA, 5 linear, 5 SLERP),
and a grid file's mistakes are refused before any merge runs."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from megatron_ext.merge.grid import load_grid
from megatron_ext.merge.methods import MergeParams
from megatron_ext.merge.run import MergeError

GRID = Path(__file__).resolve().parents[1] / "examples" / "merge_grid.yaml"


def _table1() -> dict[str, MergeParams]:
    """Table 1's rows: DELLA d in {0.35, 0.50} x eps in {0.12, 0.15} x lambda in {1.00, 1.05} (deltas against
    Devstral, l1 rescale, seed 0), then linear and SLERP at alpha 0.10 ... 0.50."""
    rows = {
        f"della-d{d:.2f}-e{e:.2f}-l{lam:.2f}": MergeParams(
            method="della", density=d, epsilon=e, lam=lam, rescale="l1", seed=0
        )
        for d, e, lam in itertools.product((0.35, 0.50), (0.12, 0.15), (1.00, 1.05))
    }
    for method, alpha in itertools.product(("linear", "slerp"), (0.10, 0.20, 0.30, 0.40, 0.50)):
        rows[f"{method}-{alpha:.2f}"] = MergeParams(method=method, alpha=alpha, seed=0)
    return rows


def test_example_grid_is_the_papers_table_1() -> None:
    runs = load_grid(GRID)
    expected = _table1()
    assert len(runs) == 18 == len(expected)
    assert [name for name, _ in runs] == list(expected)  # the table's order
    for name, params in runs:
        assert params == expected[name], name
    counts = {m: sum(p.method == m for _, p in runs) for m in ("della", "linear", "slerp")}
    assert counts == {"della": 8, "linear": 5, "slerp": 5}


@pytest.mark.parametrize(
    "text, message",
    [
        ("runs: []\n", "no runs"),
        ("runs:\n  - {name: a, method: linear}\n  - {name: a, method: slerp}\n", "duplicate run name a"),
        ("runs:\n  - {name: a, method: linear, alhpa: 0.1}\n", r"run a: unknown keys \['alhpa'\]"),
        ("runs:\n  - {name: a, alpha: 0.1}\n", "run a: no method"),
        ("runs:\n  - {name: a, method: della, density: 0.1, epsilon: 0.2}\n", r"run a: density=0.1 epsilon=0.2"),
        ("runs:\n  - {name: ../../x, method: linear}\n", r"run name '\.\./\.\./x' is not a plain directory name"),
        ("runs:\n  - {name: /tmp/abs, method: linear}\n", r"run name '/tmp/abs' is not a plain directory name"),
        ("runs:\n  - {name: .., method: linear}\n", r"run name '\.\.' is not a plain directory name"),
        ("runs:\n  - {name: 5, method: linear}\n", r"run name 5 is not a plain directory name"),
        ("- {name: a, method: linear}\n", r"expected a mapping with `defaults:` and `runs:`, got list"),
        ("runs: {name: a}\n", r"`runs` a list"),
        ("runs:\n  - linear\n", r"run 0 is not a mapping"),
        ("runs:\n  - {name: a, method: della, lambda: .nan}\n", r"run a: lambda=nan: must be a finite number"),
        ("runs:\n  - {name: a, method: linear, alpha: '0.1'}\n", r"run a: alpha='0.1': must be a finite number"),
        ("runs:\n  - {name: a, method: della, seed: 1.5}\n", r"run a: seed=1.5: must be an integer"),
    ],
)
def test_bad_grid_files_are_refused_naming_the_run(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(MergeError, match=message):
        load_grid(path)
