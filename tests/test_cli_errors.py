"""The CLI error policy: the user's mistakes are one `error:` line and exit 2, unexpected errors keep their traceback.

Real tool processes (tools/*.py, as `make` and the README run them) on real bad inputs, one per tool, plus
the policy itself on each kind of exception.
"""

from __future__ import annotations

import ast
import builtins
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.cli._errors import error_policy
from megatron_ext.errors import ProjectError

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _bad_inputs(tiny: Path, tmp: Path) -> dict[str, tuple[list[object], str]]:
    """Per tool: arguments with one bad input, and what its error line must name."""
    (tmp / "cut.json").write_text('{"vocab": [')  # a file cut short
    (tmp / "config.yaml").write_text("training: {lr: [\n")  # YAML that does not parse
    (tmp / "refs.jsonl").write_text('{"id": "a", "text": "hello"}\n{"id": "b", \n')
    (tmp / "records").mkdir()
    (tmp / "records" / "r.jsonl").write_text(json.dumps({"checkpoint": "x"}) + "\n")
    hf = tiny / "voxtral-hf"
    return {
        "convert": (["--input", tmp / "absent", "--output", tmp / "o", "--to", "megatron"], "absent"),
        "merge": (
            ["--devstral", tmp / "absent", "--voxtral", hf, "--method", "linear", "--rope-from", "devstral"]
            + ["--output", tmp / "o", "--no-progress"],
            "absent",
        ),
        "align_tokenizer": (["--devstral", tmp / "cut.json", "--voxtral", hf, "--output", tmp / "o"], "cut.json"),
        "logits": (["--checkpoint", tmp / "absent", "--tokens", "1,2", "--output", tmp / "o.safetensors"], "absent"),
        "train": (["--config", tmp / "config.yaml", "--dry-run"], "config.yaml"),
        "evaluate": (["wer", "--references", tmp / "refs.jsonl", "--hypotheses", tmp / "refs.jsonl"], "refs.jsonl"),
        "report": (["--results", tmp / "records", "--output", tmp / "o"], "r.jsonl"),
        "synth_audio": (["--input", tmp / "absent.jsonl", "--output", tmp / "o"], "absent.jsonl"),
        "miniature_recipe": (["--recipe", tmp / "config.yaml", "--output", tmp / "o"], "config.yaml"),
    }


TOOLS = [
    "convert",
    "merge",
    "align_tokenizer",
    "logits",
    "train",
    "evaluate",
    "report",
    "synth_audio",
    "miniature_recipe",
]


@pytest.mark.parametrize("tool", TOOLS)
def test_bad_input_is_one_error_line_and_exit_2(tool: str, tiny_dir: Path, tmp_path: Path) -> None:
    args, culprit = _bad_inputs(tiny_dir, tmp_path)[tool]
    proc = _tool(tool, *args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], lines
    assert culprit in lines[-1]
    assert not (tmp_path / "o").exists()


def test_unexpected_error_keeps_its_traceback(tiny_dir: Path, tmp_path: Path) -> None:
    """A RuntimeError inside the library (as a CUDA OOM would be) exits 1 with the full traceback."""
    script = (
        "import sys, megatron_ext.checkpoint.convert as c\n"
        "def oom(*args, **kwargs):\n"
        "    raise RuntimeError('CUDA out of memory (injected)')\n"
        "c.convert = oom\n"
        "sys.argv[0] = 'convert.py'\n"
        f"exec(open({str(ROOT / 'tools' / 'convert.py')!r}).read())\n"
    )
    args = ["--input", tiny_dir / "voxtral-hf", "--output", tmp_path / "o", "--to", "hf"]
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and " in oom\n" in proc.stderr
    assert proc.stderr.rstrip().endswith("RuntimeError: CUDA out of memory (injected)")
    assert "error: " not in proc.stderr


def _raising(exc: BaseException):
    @error_policy
    def main(argv: list[str] | None = None) -> int:
        raise exc

    return main


@pytest.mark.parametrize(
    "exc, line",
    [
        (ProjectError("model.safetensors: header\nis cut short"), "error: model.safetensors: header is cut short"),
        (
            FileNotFoundError(2, "No such file or directory", "x.json"),
            "error: [Errno 2] No such file or directory: 'x.json'",
        ),
        (json.JSONDecodeError("Expecting value", '{"a": }', 6), "error: Expecting value: line 1 column 7 (char 6)"),
        (ValueError(), "error: ValueError"),
    ],
    ids=["project-multiline", "oserror", "json", "empty-message"],
)
def test_policy_prints_one_line_and_returns_2(exc: BaseException, line: str, capsys: pytest.CaptureFixture) -> None:
    assert _raising(exc)([]) == 2
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


@pytest.mark.parametrize("exc", [RuntimeError("NCCL timeout at step 10000"), KeyError("x"), KeyboardInterrupt()])
def test_policy_lets_unexpected_errors_through(exc: BaseException, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(type(exc)):
        _raising(exc)([])
    assert capsys.readouterr().err == ""


def test_policy_passes_exit_codes_through() -> None:
    assert error_policy(lambda argv: None)([]) == 0
    assert error_policy(lambda argv: 1)([]) == 1  # e.g. synth: rows remain to be done
    with pytest.raises(SystemExit):  # argparse's usage errors keep their own exit 2
        _raising(SystemExit(2))([])


def test_every_library_exception_is_a_project_error() -> None:
    """Each exception class defined in megatron_ext derives from ProjectError (directly or through another), so
    every tool reports it alike; found by reading the source, so a new class is checked too."""
    builtin = {name for name, obj in vars(builtins).items() if isinstance(obj, type) and issubclass(obj, BaseException)}
    bases: dict[str, list[str]] = {}
    for path in (ROOT / "megatron_ext").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases]
                bases[node.name] = names

    def is_exception(name: str) -> bool:
        return name in builtin or any(is_exception(b) for b in bases.get(name, []))

    def is_project(name: str) -> bool:
        return name == "ProjectError" or any(is_project(b) for b in bases.get(name, []))

    exceptions = sorted(n for n in bases if n != "ProjectError" and is_exception(n))
    assert {"CheckpointError", "ConfigError", "MergeError", "SynthError", "StartupError"} <= set(exceptions)
    assert [n for n in exceptions if not is_project(n)] == []


def test_convert_entry_point_starts_without_torch() -> None:
    """Moving the tools into megatron_ext/cli keeps convert's order: THP default set and source hashing
    started before anything imports torch (importing the entry point must not load it)."""
    script = (
        "import os, sys; os.environ.pop('THP_MEM_ALLOC_ENABLE', None)\n"
        "import megatron_ext.cli.convert\n"
        "print('torch' in sys.modules, os.environ.get('THP_MEM_ALLOC_ENABLE'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["False", "1"], proc.stderr
