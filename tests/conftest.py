"""Shared fixtures: the tiny parent models are built once per test session into a temporary directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Tool subprocesses (python tools/*.py, launch scripts) import this checkout's megatron_ext, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from megatron_ext.testing.tiny_models import build_tiny_models  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_hash_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Source-hash cache of the session (tools and CLI children inherit it), never the user's."""
    os.environ["MEGATRON_EXT_CACHE"] = str(tmp_path_factory.mktemp("hash-cache"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding every tiny parent (`build_tiny_models`, seed 0): *-hf, *-native, voxtral-hf-sharded."""
    out = tmp_path_factory.mktemp("tiny") / "models"
    build_tiny_models(out, seed=0)
    return out
