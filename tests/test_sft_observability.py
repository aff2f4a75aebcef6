"""SFT faults and observability on the tiny Voxtral-layout model (CPU, fp32): a stop signal saves at the next
step boundary and the rerun resumes exactly; per-phase timers, profiler traces, the resolved config in
TensorBoard and in every checkpoint, the distributed timeout, optional W&B logging (offline). Two-rank runs
(own processes, gloo) are `slow`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from sft_runs import read_scalars, run_overrides, sft_env

from megatron_ext.training.config import TrainConfigError, load_config
from megatron_ext.training.signals import EXIT_SAVED_ON_SIGNAL

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "examples/configs/tiny_cpu.yaml"
SBATCH = ROOT / "launch_scripts/train_slurm.sbatch"


@pytest.fixture(scope="module")
def env(tiny_dir: Path, tmp_path_factory) -> dict[str, Path]:
    return sft_env(tiny_dir, tmp_path_factory.mktemp("sft-obs"))


def overrides(env: dict[str, Path], run: str, **extra: object) -> list[str]:
    """Five steps of 256 tokens, no validation, no periodic save (a run saves at its end or on a signal)."""
    settings = {
        "training.seq_length": 256,
        "training.train_iters": 5,
        "checkpoint.save_interval": 100,
        "logging.eval_interval": 0,
    }
    return run_overrides(env, run, **{**settings, **extra})


class _SignalAtLogLine(logging.Handler):
    """Sends `sig` to this process when the trainer logs step `step` (deterministic, in-process)."""

    def __init__(self, sig: int, step: int) -> None:
        super().__init__()
        self.sig, self.prefix = sig, f"step {step}/"

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            os.kill(os.getpid(), self.sig)


@contextlib.contextmanager
def signal_at_step_log(sig: int, step: int) -> Iterator[None]:
    """While active, the trainer's "step N/..." log line (rank 0, this process) raises `sig` in this process."""
    logger, trigger = logging.getLogger("megatron_ext.training.sft"), _SignalAtLogLine(sig, step)
    level = logger.level
    logger.addHandler(trigger)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(trigger)
        logger.setLevel(level)


# ---- one process, in this test's process ------------------------------------------------------------
@pytest.fixture(scope="module")
def single(env: dict[str, Path]):
    """An uninterrupted 5-step run (timers, profiler over steps 2..3, eval at 4) and a run stopped by SIGUSR1
    while step 2 is logged, then resumed to step 5."""
    from megatron_ext.training.sft import train

    full = train(
        load_config(
            TINY_CONFIG, overrides(env, "full", **{"training.profile_steps": "[2,3]", "logging.eval_interval": 4})
        )
    )
    with signal_at_step_log(signal.SIGUSR1, 2):
        stopped = train(load_config(TINY_CONFIG, overrides(env, "stopped", **{"logging.eval_interval": 4})))
    # what a save killed mid-way leaves behind: a hidden partial of the next step, never resumed from
    partial = env["root"] / "stopped" / ".iter_0000004.partial-otherhost-1"
    partial.mkdir()
    (partial / "common.pt").write_bytes(b"truncated")
    resumed = train(load_config(TINY_CONFIG, overrides(env, "stopped", **{"logging.eval_interval": 4})))
    return full, stopped, resumed


def test_signal_saves_at_next_step_and_resume_is_bit_identical(single, env: dict[str, Path]) -> None:
    full, stopped, resumed = single
    assert stopped.stopped_by == "SIGUSR1" and sorted(stopped.losses) == [1, 2, 3]  # signal during step 2's log
    saved = sorted(p.name for p in (env["root"] / "stopped").iterdir() if p.name.startswith("iter_"))
    assert saved[0] == "iter_0000003" and resumed.resumed_from == 3 and sorted(resumed.losses) == [4, 5]
    assert resumed.stopped_by is None
    assert [stopped.losses[s] for s in (1, 2, 3)] + [resumed.losses[s] for s in (4, 5)] == [
        full.losses[s] for s in range(1, 6)
    ]  # float64, bit for bit
    assert resumed.validation == full.validation


def test_cli_exit_code_after_a_signal(env: dict[str, Path], capsys) -> None:
    """tools/train.py exits 75 after a stop signal with a save, and refuses (exit 2, one line) without a save_dir."""
    from megatron_ext.cli.train import main

    args = ["--config", str(TINY_CONFIG), *overrides(env, "cli", **{"training.train_iters": 3})]
    with signal_at_step_log(signal.SIGTERM, 1):
        assert main(args) == EXIT_SAVED_ON_SIGNAL
    assert (env["root"] / "cli" / "iter_0000002" / "config.yaml").is_file()
    with signal_at_step_log(signal.SIGTERM, 1):
        assert main([*args, "checkpoint.save_dir=null", "checkpoint.resume=false"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: stopped by SIGTERM with nothing saved: checkpoint.save_dir is not set"
    )


def test_phase_timers_add_up_to_the_step_time(single, env: dict[str, Path]) -> None:
    """Every step: the phases sum to the independently measured step time within 5%; TensorBoard has them."""
    full, _, _ = single
    assert sorted(full.timings) == [1, 2, 3, 4, 5]
    for step, t in full.timings.items():
        phases = sum(v for k, v in t.items() if k != "step")
        assert abs(phases - t["step"]) <= 0.05 * t["step"], (step, t)
        assert t["forward_backward"] > 0 and t["data"] > 0 and t["optimizer"] > 0
    assert full.timings[4]["validation"] > 0 and full.timings[3]["validation"] == 0
    assert full.timings[5]["checkpoint"] > full.timings[4]["checkpoint"]  # step 5 saves
    scalars = read_scalars(env["root"] / "full" / "tb")
    for name in ("data", "forward_backward", "optimizer", "validation", "checkpoint", "step", "step_spread"):
        assert sorted(scalars[f"timers/{name}_s"]) == [1, 2, 3, 4, 5], name
    assert all(v == 0 for v in scalars["timers/step_spread_s"].values())  # one rank: no spread
    assert scalars["timers/step_s"][5] == pytest.approx(full.timings[5]["step"], rel=1e-6)


def test_profiler_writes_one_trace_over_the_step_range(single, env: dict[str, Path]) -> None:
    traces = sorted((env["root"] / "full" / "profile").iterdir())
    assert [p.name for p in traces] == ["rank-00000.steps-2-3.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    spans = sorted({e["name"] for e in events if e.get("name", "").startswith("train_step ")})
    assert spans == ["train_step 2", "train_step 3"]
    assert any(e.get("name") == "aten::mm" for e in events)  # the model's matmuls were recorded


def test_resolved_config_in_tensorboard_and_every_checkpoint(single, env: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = env["root"] / "stopped"
    for step in ("iter_0000003", "iter_0000005"):
        saved = yaml.safe_load((run / step / "config.yaml").read_text())
        assert saved["training"]["seq_length"] == 256 and saved["model"]["checkpoint"] == str(env["ckpt"])
    acc = EventAccumulator(str(env["root"] / "full" / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    profile_steps:" in text and "seq_length: 256" in text


def test_config_checks_profile_steps_and_timeout(env: dict[str, Path]) -> None:
    cfg = lambda **o: load_config(TINY_CONFIG, overrides(env, "c", **o))  # noqa: E731
    assert cfg(**{"training.profile_steps": "[3,3]"}).training.profile_steps == [3, 3]
    for bad in ("[3,2]", "[0,2]", "[1,2,3]"):
        with pytest.raises(TrainConfigError, match=r"^training.profile_steps: must be \[first, last\]"):
            cfg(**{"training.profile_steps": bad})
    with pytest.raises(TrainConfigError, match=r"^training.profile_steps: needs checkpoint.save_dir"):
        cfg(**{"training.profile_steps": "[1,2]", "checkpoint.save_dir": "null", "logging.tensorboard_dir": "null"})
    with pytest.raises(TrainConfigError, match=r"^parallel.distributed_timeout_minutes: must be a finite number > 0"):
        cfg(**{"parallel.distributed_timeout_minutes": 0})


# ---- optional W&B beside TensorBoard (offline: no network) ----------------------------------------------
def read_wandb_run(directory: Path) -> tuple[object, dict[int, dict[str, float]]]:
    """The run record and the logged history {step: {name: value}} of the one offline run under `directory`,
    read from its .wandb file with wandb's own record reader."""
    from wandb.proto.wandb_internal_pb2 import Record
    from wandb.sdk.internal.datastore import DataStore

    [path] = (directory / "wandb").glob("offline-run-*/run-*.wandb")
    store = DataStore()
    store.open_for_scan(str(path))
    run, history = None, {}
    while (data := store.scan_data()) is not None:
        record = Record.FromString(data)
        if record.HasField("run"):
            run = record.run
        elif record.HasField("history"):
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run, history


def test_wandb_offline_logs_the_tensorboard_scalars_and_the_config(env: dict[str, Path], monkeypatch) -> None:
    """WANDB_MODE=offline: rank 0's W&B run under save_dir holds every TensorBoard scalar at every logged step
    (equal within TensorBoard's float32, rel 1e-6) and the resolved config."""
    from megatron_ext.training.sft import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(env["root"] / "wandb-home"))
    run_dir = env["root"] / "wandb"
    extra = {"training.train_iters": 2, "logging.eval_interval": 2, "logging.wandb_project": "devstral-audio-test"}
    result = train(load_config(TINY_CONFIG, overrides(env, "wandb", **extra, **{"logging.wandb_run_name": "tiny"})))
    run, history = read_wandb_run(run_dir)
    assert (run.project, run.display_name) == ("devstral-audio-test", "tiny")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["training"]["seq_length"] == 256 and config["model"]["checkpoint"] == str(env["ckpt"])
    assert config["logging"]["wandb_project"] == "devstral-audio-test"
    board = read_scalars(run_dir / "tb")
    assert sorted(history) == [1, 2] and "val/loss" in board and "timers/step_s" in board
    assert {name for row in history.values() for name in row} == set(board)
    for name, steps in board.items():
        for step, value in steps.items():
            assert history[step][name] == pytest.approx(value, rel=1e-6), (name, step)
    assert history[2]["train/loss"] == result.losses[2] and history[2]["val/loss"] == result.validation[2]


def test_wandb_config_checks(env: dict[str, Path]) -> None:
    cfg = lambda **o: load_config(TINY_CONFIG, overrides(env, "c", **o))  # noqa: E731
    assert cfg().logging.wandb_project is None
    for key in ("wandb_run_name", "wandb_dir"):
        with pytest.raises(TrainConfigError, match=rf"^logging.{key}: needs logging.wandb_project$"):
            cfg(**{f"logging.{key}": "x"})
    for bad in ("a/b", "team:x", "' '", "p" * 129):
        with pytest.raises(TrainConfigError, match=r"^logging.wandb_project: .* is not a W&B project name"):
            cfg(**{"logging.wandb_project": bad})
    with pytest.raises(TrainConfigError, match=r"^logging.wandb_project: needs logging.wandb_dir, checkpoint"):
        cfg(**{"logging.wandb_project": "p", "checkpoint.save_dir": "null", "logging.tensorboard_dir": "null"})


def test_wandb_missing_is_one_error_line(env: dict[str, Path], monkeypatch, capsys) -> None:
    """Without the wandb package a run with logging.wandb_project stops at startup: exit 2, one `error:` line."""
    from megatron_ext.cli.train import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, find_spec finds nothing
    assert main(["--config", str(TINY_CONFIG), *overrides(env, "nowandb"), "logging.wandb_project=p"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: logging.wandb_project=p: the wandb package is not installed "
        "(pip install -r requirements-wandb.txt, or unset logging.wandb_project)"
    )
    assert not (env["root"] / "nowandb").exists()


def test_stop_signal_is_recorded_here_and_kills_a_forked_child() -> None:
    """The training process records SIGTERM; a child forked while the handler is active (a data worker) still
    dies of it, so a pool can terminate its workers."""
    import multiprocessing

    from megatron_ext.training.signals import StopSignal

    with StopSignal() as stop:
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()
        time.sleep(0.2)
        child.terminate()  # SIGTERM
        child.join(timeout=30)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs at the next bytecode boundary of the main thread
    assert child.exitcode == -signal.SIGTERM and stop.received == signal.SIGTERM


# ---- the distributed timeout reaches the process group --------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TIMEOUT_RANK = """
import sys, time, torch, torch.distributed as dist
from megatron_ext.compat.cpu import init_distributed
init_distributed(timeout_minutes=0.05)  # 3 s
if dist.get_rank() == 1:
    time.sleep(30)  # never joins the all-reduce
    sys.exit(0)
started = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except RuntimeError as exc:
    print(f"timed out after {time.monotonic() - started:.1f}s: {str(exc).splitlines()[0]}")
    sys.exit(3)
"""


def test_distributed_timeout_fails_a_stuck_collective(tmp_path: Path) -> None:
    """Rank 1 never joins: rank 0's all-reduce fails after the configured 3 s, not gloo's default 30 min."""
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TIMEOUT_RANK],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        out, err = procs[0].communicate(timeout=120)
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode == 3, err[-2000:]
    seconds = float(out.split("timed out after ")[1].split("s")[0])
    assert 2.5 <= seconds <= 20, out


# ---- two ranks in their own processes (as srun starts them), gloo ------------------------------------------
def launch(env: dict[str, Path], run: str, **extra: object) -> list[subprocess.Popen]:
    """Two trainer ranks started the way launch_scripts/train_slurm.sbatch starts them (one process each)."""
    port = str(_free_port())
    args = [sys.executable, str(ROOT / "tools/train.py"), "--config", str(TINY_CONFIG), *overrides(env, run, **extra)]
    return [
        subprocess.Popen(
            args,
            cwd=ROOT,
            env={
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "WORLD_SIZE": "2",
                "RANK": str(r),
                "LOCAL_RANK": str(r),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]


def finish(procs: list[subprocess.Popen], timeout: int = 600) -> list[tuple[int, str]]:
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]


@pytest.mark.slow
def test_two_ranks_write_one_wandb_run(env: dict[str, Path], monkeypatch) -> None:
    """TP=2 in two processes: only rank 0 starts a W&B run (offline), and it holds every TensorBoard scalar."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(env["root"] / "wandb-home"))
    extra = {"parallel.tensor_model_parallel_size": 2, "training.train_iters": 2, "logging.wandb_project": "p"}
    results = finish(launch(env, "wandb-tp2", **extra))
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:]
    assert len(list((env["root"] / "wandb-tp2" / "wandb").glob("offline-run-*"))) == 1
    _, history = read_wandb_run(env["root"] / "wandb-tp2")
    board = read_scalars(env["root"] / "wandb-tp2" / "tb")
    assert sorted(history) == [1, 2] and {name for row in history.values() for name in row} == set(board)
    assert history[2]["train/loss"] == pytest.approx(board["train/loss"][2], rel=1e-6)


TWO_RANKS = {"training.train_iters": 12, "training.seq_length": 512}


@pytest.fixture(scope="module")
def reference(env: dict[str, Path]) -> dict[int, float]:
    """The uninterrupted 2-rank run: its losses (TensorBoard, float32 as logged)."""
    results = finish(launch(env, "ref2", **TWO_RANKS))
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:]
    return read_scalars(env["root"] / "ref2" / "tb")["train/loss"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "target"), [(signal.SIGUSR1, 1), (signal.SIGTERM, 0)], ids=["SIGUSR1-to-rank1", "SIGTERM-to-rank0"]
)
def test_two_ranks_stop_together_on_a_signal_to_one_rank(env, reference, sig: int, target: int) -> None:
    """The signal reaches one rank only: both save the same step and exit 75; the rerun resumes from it and its
    losses (float32 in TensorBoard) and final weights equal the uninterrupted run's exactly."""
    from megatron_ext.checkpoint.torch_dist_io import TorchDistReader

    run = f"sig-{signal.Signals(sig).name}"
    procs = launch(env, run, **TWO_RANKS)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(procs[0].stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    while not any(" step 2/12 " in line for line in lines):
        assert procs[0].poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.05)
    procs[target].send_signal(sig)
    codes = [p.wait(timeout=600) for p in procs]
    reader.join(timeout=60)
    assert codes == [EXIT_SAVED_ON_SIGNAL] * 2, "".join(lines)[-3000:]
    saved = sorted(p.name for p in (env["root"] / run).iterdir() if p.name.startswith("iter_"))
    assert len(saved) == 1, saved
    stopped_at = int(saved[0].removeprefix("iter_"))
    assert 3 <= stopped_at < 12 and (env["root"] / run / "latest_checkpointed_iteration.txt").read_text() == str(
        stopped_at
    )
    results = finish(launch(env, run, **TWO_RANKS))
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:]
    assert f"resumed from {env['root'] / run / saved[0]} (step {stopped_at})" in results[0][1]
    scalars = read_scalars(env["root"] / run / "tb")
    assert scalars["train/loss"] == reference
    spread, step_max = scalars["timers/step_spread_s"], scalars["timers/step_s"]
    assert all(0 <= spread[s] <= step_max[s] for s in spread) and max(spread.values()) > 0  # two ranks differ
    final, ref = (
        TorchDistReader(env["root"] / run / "iter_0000012"),
        TorchDistReader(env["root"] / "ref2" / "iter_0000012"),
    )
    assert ref.names() == final.names()
    assert all(torch.equal(ref.get(n), final.get(n)) for n in ref.names())


# ---- the SLURM script's preemption path -------------------------------------------------------------------
SRUN = r"""#!/usr/bin/env bash
# stand-in for srun on one machine (see the test using it)
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
trap 'kill -s USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'kill -s TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
  code=0; wait "$pid" || code=$?
  if (( code > rc )); then rc=$code; fi
done
exit "$rc"
"""

SCONTROL = r"""#!/usr/bin/env bash
# stand-in for scontrol: the node list's first host, and a record of requeue requests
case "$1" in
  show) echo 127.0.0.1 ;;
  requeue) echo "requeue $2" >> "$SCONTROL_LOG" ;;
  *) exit 1 ;;
esac
"""


def _slurm_env(tmp_path: Path, config_env: dict[str, str]) -> dict[str, str]:
    stubs = tmp_path / "slurm-bin"
    stubs.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node001",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": "2",
        "GPUS_PER_NODE": "2",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "MASTER_PORT": str(_free_port()),
        "PYTHON": sys.executable,
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        **config_env,
    }


@pytest.mark.slow
def test_slurm_script_saves_on_usr1_requeues_and_the_requeued_job_resumes(env, reference, tmp_path: Path) -> None:
    """launch_scripts/train_slurm.sbatch with stand-ins for srun and scontrol (no SLURM here; they do what the
    script relies on: srun starts SLURM_NTASKS tasks with their SLURM_PROCID/SLURM_LOCALID, forwards signals to
    them and exits with the highest task code; scontrol names the node and records a requeue). USR1 to the batch
    shell -> every rank saves -> exit 75 -> `scontrol requeue` -> the requeued job resumes exactly."""
    run_env = _slurm_env(tmp_path, {"CONFIG": str(TINY_CONFIG)})
    args = ["bash", str(SBATCH), *overrides(env, "slurm", **TWO_RANKS)]
    job = subprocess.Popen(args, cwd=tmp_path, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    while not any(" step 2/12 " in line for line in lines):
        assert job.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does: the batch shell only
    assert job.wait(timeout=600) == EXIT_SAVED_ON_SIGNAL, "".join(lines)[-3000:]
    reader.join(timeout=60)
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    saved = [p.name for p in (env["root"] / "slurm").iterdir() if p.name.startswith("iter_")]
    assert len(saved) == 1 and saved[0] < "iter_0000012", saved

    again = subprocess.run(args, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"(step {int(saved[0].removeprefix('iter_'))})" in again.stdout + again.stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # a finished job is not requeued
    assert read_scalars(env["root"] / "slurm" / "tb")["train/loss"] == reference
