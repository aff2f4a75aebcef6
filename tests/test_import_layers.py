"""Imports flow one way through megatron_ext (issue 16): an AST check of every import, lazy ones included.

Layers, bottom first; a package may import its own modules and any package in a lower layer:
  0. errors: the ProjectError base every error class derives from
  1. config, parallel_layout, user_cache, compat, http_client   (parallel_layout may import config)
  2. audio
  3. checkpoint: reading, writing and atomic outputs
  4. tokenizer: tekken files (written through checkpoint's atomic outputs) and their alignment
  5. models
  6. merge, training, eval, data                                (training may import data)
  7. testing: tiny fixtures and the mergekit reference, for tests, the demo and benchmarks
  8. miniature: the demo's toy tasks and trained tiny parents (built on the layers below, tiny layouts included)
  9. cli: the tools' code (argument parsing + one library call each; the fixture tools call testing)
No library module imports `benchmarks`, `tools` or `tests`; below the miniature, nothing imports `testing`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    {"errors"},
    {"config", "parallel_layout", "user_cache", "compat", "http_client"},
    {"audio"},
    {"checkpoint"},
    {"tokenizer"},
    {"models"},
    {"merge", "training", "eval", "data"},
    {"testing"},
    {"miniature"},
    {"cli"},
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}
SAME_LAYER_ALLOWED = {("parallel_layout", "config"), ("training", "data")}
OUTSIDE_LIBRARY = {"benchmarks", "tools", "tests"}


def _imported_modules(module: str, is_package: bool, tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import anywhere in the tree, relative ones resolved; for
    `from megatron_ext import x` the name is `megatron_ext.x`; constant-string `importlib.import_module`
    calls count too."""
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package_parts[: len(package_parts) - node.level + 1] + ([base] if base else []))
            if base == "megatron_ext":
                found += [(node.lineno, f"megatron_ext.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _package(dotted: str) -> str | None:
    """The megatron_ext top-level package (or module) a dotted name lies in; None for the root itself."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else None


def violations(module: str, source: str, is_package: bool = False, where: str = "") -> list[str]:
    """One line per wrong-way import in `source`, the text of module `module` (e.g. megatron_ext.eval.voice)."""
    importer = _package(module)
    problems = []
    if importer not in RANK:
        return [f"{where or module}: package {importer!r} is in no layer; add it to LAYERS in {Path(__file__).name}"]
    for line, name in _imported_modules(module, is_package, ast.parse(source)):
        top = name.split(".")[0]
        target = _package(name) if top == "megatron_ext" else None
        if top in OUTSIDE_LIBRARY:
            reason = f"`{top}` is outside the library"
        elif top != "megatron_ext" or target is None or target == importer:
            continue
        elif target not in RANK:
            reason = f"{target!r} is in no layer"
        elif RANK[target] > RANK[importer] or (
            RANK[target] == RANK[importer] and (importer, target) not in SAME_LAYER_ALLOWED
        ):
            reason = f"{importer} (layer {RANK[importer]}) may not import {target} (layer {RANK[target]})"
        else:
            continue
        problems.append(f"{where or module}:{line}: {module} imports {name}: {reason}")
    return problems


def _library_modules() -> list[tuple[str, Path]]:
    return [
        (".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), path)
        for path in sorted((ROOT / "megatron_ext").rglob("*.py"))
    ]


def test_library_imports_flow_one_way() -> None:
    modules = _library_modules()
    assert len(modules) > 50  # the walk found the library
    problems = [
        p
        for module, path in modules
        if module != "megatron_ext"
        for p in violations(module, path.read_text(), path.name == "__init__.py", str(path.relative_to(ROOT)))
    ]
    assert not problems, "wrong-way imports (see the layers in tests/test_import_layers.py):\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "module, source, expected",
    [
        (
            "megatron_ext.eval.voice",
            "from megatron_ext.data.synth.tts import TTS",
            "eval (layer 6) may not import data",
        ),
        (
            "megatron_ext.checkpoint.formats",
            "def f():\n    import megatron_ext.models.build",
            "imports megatron_ext.models",
        ),
        ("megatron_ext.audio.tts", "from megatron_ext import eval", "audio (layer 2) may not import eval"),
        ("megatron_ext.models.loading", "from ..training import sft", "imports megatron_ext.training"),
        ("megatron_ext.merge.run", "from megatron_ext.testing.tiny_models import X", "may not import testing"),
        ("megatron_ext.data.loader", "import benchmarks.merge_speed", "outside the library"),
        ("megatron_ext.config", "importlib.import_module('megatron_ext.audio.wer')", "config (layer 1) may not"),
        (
            "megatron_ext.checkpoint.convert",
            "from megatron_ext.tokenizer import align",
            "checkpoint (layer 3) may not import tokenizer",
        ),
        ("megatron_ext.newpkg.x", "import os", "in no layer"),
    ],
)
def test_wrong_way_imports_are_named(module: str, source: str, expected: str) -> None:
    problems = violations(module, source)
    assert len(problems) == 1 and expected in problems[0] and module in problems[0]


@pytest.mark.parametrize(
    "module, source",
    [
        ("megatron_ext.training.sft", "from megatron_ext.data.chat import ChatEncoder"),
        ("megatron_ext.eval.voice", "def f():\n    from megatron_ext.audio.tts import TTS"),
        (
            "megatron_ext.data.synth.judge",
            "from . import rules\nfrom ..chat import x\nfrom megatron_ext.http_client import A",
        ),
        ("megatron_ext.parallel_layout", "from megatron_ext.config import ModelConfig"),
        ("megatron_ext.testing.tiny_models", "from megatron_ext.merge.methods import slerp"),
    ],
)
def test_downward_and_sibling_imports_pass(module: str, source: str) -> None:
    assert violations(module, source) == []
