"""Load a repository script under tools/ as a module (the bench tools are scripts, not installed modules)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tool_main(name: str) -> Callable[..., int]:
    """`main` of tools/NAME.py, loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
