"""Exactly once: workers SIGKILLed at random moments, then resumed, give the uninterrupted run's bytes."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "data" / "coding_trajectories.jsonl"


def _input(tmp_path: Path, copies: int = 3) -> Path:
    """The bundled sample repeated, so a kill lands in the middle of real work."""
    rows = SAMPLE.read_text().splitlines() * copies
    path = tmp_path / "input.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def _command(inp: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "tools" / "synth_audio.py"),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--workers",
        "2",
        "--num-shards",
        "3",
        "--tts-engine",
        "espeak",
        "--concurrency",
        "2",
        "--skip-energon-prepare",
    ]


def _outputs(out: Path) -> dict[str, bytes]:
    """Samples and tars as bytes; judgment logs without their (timing-dependent) latency."""
    files = {p.name: p.read_bytes() for p in [*out.glob("samples-*.jsonl"), *out.glob("wds/*.tar")]}
    for p in out.glob("judgments-*.jsonl"):
        records = [json.loads(line) for line in p.read_text().splitlines()]
        files[p.name] = json.dumps(
            sorted(({**r, "latency_s": 0} for r in records), key=lambda r: (r["row"], r["message"]))
        ).encode()
    return files


def _kill_randomly(cmd: list[str], rng: random.Random, duration_s: float) -> int:
    """Start the run and SIGKILL the parent or one of its workers somewhere inside its usual duration."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.1, 0.9) * duration_s)
    workers = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children()]
    try:
        os.kill(rng.choice(workers), signal.SIGKILL)
    except ProcessLookupError:
        pass  # it finished before the kill
    return proc.wait(timeout=120)


def _check_exactly_once(tmp_path: Path, runs: int, seed: int) -> None:
    inp = _input(tmp_path)
    reference = tmp_path / "reference"
    start = time.perf_counter()
    subprocess.run(_command(inp, reference), check=True, capture_output=True, timeout=300)
    duration_s = time.perf_counter() - start
    expected = _outputs(reference)
    rows = sum(1 for _ in inp.open())
    rng = random.Random(seed)
    interrupted = 0
    for i in range(runs):
        out = tmp_path / f"run{i}"
        interrupted += _kill_randomly(_command(inp, out), rng, duration_s) != 0
        done = subprocess.run(_command(inp, out), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        got = _outputs(out)
        assert got == expected, f"run {i}: outputs differ from the uninterrupted run"
        seen = [json.loads(line)["synth"]["row"] for p in out.glob("samples-*.jsonl") for line in p.open()]
        assert sorted(seen) == list(range(1, rows + 1))
    assert interrupted > runs // 2, f"only {interrupted} of {runs} kills interrupted a run"


def test_random_sigkills_then_resume_give_every_row_exactly_once_quick(tmp_path):
    _check_exactly_once(tmp_path, runs=3, seed=1)


@pytest.mark.slow
def test_random_sigkills_then_resume_give_every_row_exactly_once_20_runs(tmp_path):
    _check_exactly_once(tmp_path, runs=20, seed=2)


def _first_sample_line(out: Path, proc: subprocess.Popen, timeout_s: float = 120) -> bool:
    """Wait until a samples file holds a complete line (the write window is open); False if the run ended first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if any(b"\n" in p.read_bytes() for p in out.glob("samples-*.jsonl")):
            return True
        time.sleep(0.01)
    return False


def test_sigkill_inside_the_write_window_then_rerun_is_byte_identical(tmp_path):
    """Killed right after its first sample line is written: no shard is marked complete and no report is
    written (nothing a consumer accepts); the rerun's outputs equal an uninterrupted run's bytes."""
    inp = _input(tmp_path, copies=1)
    reference, out = tmp_path / "reference", tmp_path / "out"
    subprocess.run(_command(inp, reference), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(_command(inp, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    in_window = _first_sample_line(out, proc)
    for pid in [c.pid for c in psutil.Process(proc.pid).children(recursive=True)] + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    assert in_window, "the run ended before its first sample line appeared"
    assert not (out / "report.json").exists()
    assert len(list((out / "completions").glob("*"))) < 3  # three shards: at least one was still being written
    done = subprocess.run(_command(inp, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _outputs(out) == _outputs(reference)
