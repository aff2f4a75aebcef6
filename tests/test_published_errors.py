"""Bad published-layout parents (issue 17): one `error:` line naming the file / tensor / field, nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.convert import convert

ROOT = Path(__file__).resolve().parents[1]
SHARD1 = "model-00001-of-00002.safetensors"
Q0 = "language_model.model.layers.0.self_attn.q_proj."


def _edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit_shard(path: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, str(path))
    index = path.parent / "model.safetensors.index.json"
    if index.is_file():  # keep the index true to the shards, so only the defect under test remains
        _edit_json(index, lambda d: d.update(weight_map=_weight_map(path.parent)))


def _weight_map(d: Path) -> dict[str, str]:
    return {n: f.name for f in sorted(d.glob("model-*.safetensors")) for n in load_file(f)}


def _vision_only(d: Path) -> None:
    tensors = {n: t for f in sorted(d.glob("model-*.safetensors")) for n, t in load_file(f).items()}
    for f in [*d.glob("model-*.safetensors"), d / "model.safetensors.index.json"]:
        f.unlink()
    save_file({n: t for n, t in tensors.items() if not n.startswith("language_model.")}, str(d / "model.safetensors"))


CASES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "missing weight_scale_inv": (
        "devstral2-hf",
        lambda d: _edit_shard(d / SHARD1, lambda t: t.pop(Q0 + "weight_scale_inv")),
        f"FP8 tensor {Q0}weight has no weight_scale_inv",
    ),
    "non-scalar scale": (
        "devstral2-hf",
        lambda d: _edit_shard(d / SHARD1, lambda t: t.update({Q0 + "weight_scale_inv": torch.ones(8, 1)})),
        f"scale {Q0}weight_scale_inv has shape \\[8, 1\\]; only per-tensor FP8",
    ),
    "weight_block_size set": (
        "devstral2-hf",
        lambda d: _edit_json(
            d / "config.json", lambda c: c["quantization_config"].update(weight_block_size=[128, 128])
        ),
        "quantization_config.weight_block_size=\\[128, 128\\]: block-wise FP8 is not read",
    ),
    "other quant method": (
        "devstral2-hf",
        lambda d: _edit_json(d / "config.json", lambda c: c["quantization_config"].update(quant_method="awq")),
        "quantization_config.quant_method='awq': only 'fp8' is read",
    ),
    "vision-only checkpoint": ("devstral2-hf", _vision_only, "holds only vision tensors"),
    "native qformat": (
        "devstral2-native",
        lambda d: _edit_json(d / "params.json", lambda p: p["quantization"].update(qformat_weight="int4")),
        "quantization.qformat_weight='int4': only 'fp8_e4m3' is read",
    ),
    "llama_4_scaling without yarn": (
        "devstral2-native",
        lambda d: _edit_json(d / "params.json", lambda p: p.pop("yarn")),
        "params.json: .*llama_4_scaling is set but the yarn block is missing",
    ),
    "split consolidated set missing a file": (
        "devstral2-native",
        lambda d: (d / "consolidated-00002-of-00002.safetensors").unlink(),
        "split consolidated set is missing consolidated-00002-of-00002.safetensors",
    ),
    "unknown model_type": (
        "devstral2-hf",
        lambda d: _edit_json(d / "config.json", lambda c: c.update(model_type="gemma3")),
        "unsupported model_type='gemma3' \\(known: voxtral, mistral, ministral3, mistral3\\)",
    ),
    "vision model_type": (
        "devstral2-hf",
        lambda d: _edit_json(d / "config.json", lambda c: c.update(model_type="pixtral")),
        "model_type='pixtral' is a vision-only model",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_published_parent_is_one_error_and_writes_nothing(case: str, tiny_dir: Path, tmp_path: Path) -> None:
    parent, edit, match = CASES[case]
    src = tmp_path / parent
    shutil.copytree(tiny_dir / parent, src)
    edit(src)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=match) as exc:
        convert(src, out, "megatron", progress=False)
    assert "\n" not in str(exc.value)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_cli_and_merge_print_one_error_line(tiny_dir: Path, tmp_path: Path) -> None:
    """tools/convert.py on block-wise FP8 and tools/merge.py on a vision-only parent: exit 2, one `error:` line."""
    runs = []
    for case in ("weight_block_size set", "vision-only checkpoint"):
        parent, edit, _ = CASES[case]
        src = tmp_path / case.replace(" ", "-") / parent
        shutil.copytree(tiny_dir / parent, src)
        edit(src)
        runs.append(src)
    out = tmp_path / "out"
    convert_args = ["convert.py", "--input", str(runs[0]), "--to", "megatron"]
    merge_args = ["merge.py", "--devstral", str(runs[1]), "--voxtral", str(tiny_dir / "voxtral-hf")]
    merge_args += ["--rope-from", "voxtral", "--method", "linear", "--alpha", "0.1"]
    for src, tool in zip(runs, (convert_args, merge_args), strict=True):
        cmd = [sys.executable, str(ROOT / "tools" / tool[0]), *tool[1:], "--output", str(out), "--no-progress"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
        assert str(src) in errors[0] and "Traceback" not in proc.stderr
        assert not out.exists()
