"""tools/logits.py and megatron_ext.models.logits: Megatron logits of a checkpoint vs HF transformers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_ext.config import ConfigError
from megatron_ext.models.logits import checkpoint_logits, expand_audio_markers

ROOT = Path(__file__).resolve().parents[1]
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0930.wav")
TOL = 1e-5


def test_expand_audio_markers() -> None:
    assert expand_audio_markers([1, 24, 4, 24], 24, [1, 2], 3) == [1, 24, 24, 24, 4] + [24] * 6
    assert expand_audio_markers([1] + [24] * 9, 24, [1, 2], 3) == [1] + [24] * 9  # already expanded
    with pytest.raises(ConfigError, match="2 \\[AUDIO\\] .* for 3 clip"):
        expand_audio_markers([24, 24], 24, [1, 1, 1], 375)


def test_hf_directory_with_two_clips_matches_hf(tiny_dir: Path) -> None:
    result = checkpoint_logits(
        tiny_dir / "voxtral-hf", [1, 3, 25, 24, 25, 24, 4, 1100], [LIBRIVOX, LIBRIVOX], compare_hf=True
    )
    assert result.logits.shape == (8 - 2 + 2 * 375, 2048)
    assert result.max_abs_diff is not None and result.max_abs_diff < TOL


def test_cli_on_torch_dist_checkpoint(tiny_dir: Path, tmp_path: Path) -> None:
    from megatron_ext.checkpoint.convert import convert

    convert(tiny_dir / "voxtral-hf", tmp_path / "voxtral-td", "megatron", progress=False)
    out = tmp_path / "logits.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/logits.py"),
            "--checkpoint",
            str(tmp_path / "voxtral-td"),
            "--tokens",
            "1,3,25,24,4,1100,1200",
            "--audio",
            str(LIBRIVOX),
            "--output",
            str(out),
            "--compare-hf",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    diff = float(re.search(r"^max_abs_diff=(\S+)$", proc.stdout, re.M).group(1))
    assert diff < TOL
    with safe_open(str(out), "pt") as f:
        assert list(f.keys()) == ["logits"]
        assert f.get_tensor("logits").shape == (6 + 375, 2048)
        assert f.get_tensor("logits").dtype == torch.float32
        assert f.metadata()["tokens"].startswith("1,3,25,24,24")


def test_cli_bad_input_is_one_line(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/logits.py"),
            "--checkpoint",
            str(tiny_dir / "devstral-hf"),
            "--tokens",
            "1,99999",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --tokens: id 99999 is outside the vocabulary [0, 2048)"]
    assert not out.exists()
