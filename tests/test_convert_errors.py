"""Every bad input named in issue 4 fails with one line naming the file/tensor/field, leaving nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.convert import convert
from megatron_ext.checkpoint.metadata import META_FILE, read_meta
from megatron_ext.checkpoint.safetensors_writer import SafetensorsWriter

ROOT = Path(__file__).resolve().parents[1]


def _copy(tiny_dir: Path, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(tiny_dir / name, dst)
    return dst


def _fails(src: Path, tmp_path: Path, match: str, to: str = "megatron", **kw) -> str:
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=match) as exc:
        convert(src, out, to, progress=False, **kw)
    msg = str(exc.value)
    assert "\n" not in msg
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    return msg


def _edit_tensors(d: Path, fn) -> None:
    tensors = load_file(d / "model.safetensors")
    fn(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def test_missing_shard(tiny_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "sharded"
    src.mkdir()
    tensors = load_file(tiny_dir / "devstral-hf" / "model.safetensors")
    w = SafetensorsWriter(src, tensors, max_shard_bytes=1 << 20)
    for n, t in tensors.items():
        w.write(n, t)
    shards = w.finish()
    shutil.copy(tiny_dir / "devstral-hf" / "config.json", src)
    (src / shards[1]).unlink()
    _fails(src, tmp_path, f"{shards[1]}: missing shard")


def test_truncated_shard(tiny_dir: Path, tmp_path: Path) -> None:
    src = _copy(tiny_dir, "devstral-hf", tmp_path)
    f = src / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 1000)
    _fails(src, tmp_path, "model.safetensors: truncated")


def test_unknown_and_missing_tensor_names_are_listed(tiny_dir: Path, tmp_path: Path) -> None:
    src = _copy(tiny_dir, "devstral-hf", tmp_path)
    _edit_tensors(src, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    _fails(src, tmp_path, "unknown HF tensors: model.extra.weight")
    _edit_tensors(
        src,
        lambda t: [t.pop("model.extra.weight"), t.pop("model.layers.1.mlp.up_proj.weight"), t.pop("lm_head.weight")],
    )
    _fails(src, tmp_path, "missing HF tensors: lm_head.weight, model.layers.1.mlp.up_proj.weight")


def test_shape_and_dtype_disagreeing_with_config(tiny_dir: Path, tmp_path: Path) -> None:
    src = _copy(tiny_dir, "devstral-hf", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 256}))
    _fails(src, tmp_path, r"model.layers.0.mlp.gate_proj.weight has shape \[384, 96\], config says \[256, 96\]")
    (src / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    _fails(src, tmp_path, "is torch.float32, config.json says bfloat16")


def test_conflicting_config_files(tiny_dir: Path, tmp_path: Path) -> None:
    src = _copy(tiny_dir, "devstral-hf", tmp_path)
    params = json.loads((tiny_dir / "devstral-native" / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    _fails(src, tmp_path, "config.json and params.json disagree on decoder.num_layers: 2 vs 3")


def test_tp_and_pp_not_allowed(tiny_dir: Path, tmp_path: Path) -> None:
    msg = _fails(tiny_dir / "voxtral-hf", tmp_path, "--tp 4 --pp 1 not allowed", tp=4)  # 4 encoder heads allow 4,
    assert msg.endswith("the decoder's 2 KV groups need TP in [1, 2]")  # but 2 KV groups do not
    msg = _fails(tiny_dir / "voxtral-hf", tmp_path, "--tp 3 --pp 1 not allowed", tp=3)
    assert msg.endswith("the audio encoder's 4 attention heads need TP in [1, 2, 4]")
    msg = _fails(tiny_dir / "devstral-hf", tmp_path, "--tp 1 --pp 3 not allowed: pipeline_model_parallel_size=3", pp=3)
    assert msg.endswith("the decoder's 2 layers need PP in [1, 2]")


def test_checkpoint_without_rope_is_refused_and_rope_from_supplies_it(tiny_dir: Path, tmp_path: Path) -> None:
    td = tmp_path / "td"
    convert(tiny_dir / "devstral-hf", td, "megatron", progress=False)
    meta = json.loads((td / "release" / META_FILE).read_text())
    del meta["model"]["decoder"]["rope"]
    (td / "release" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no rope settings .*--rope-from"):
        read_meta(td)
    _fails(td, tmp_path, "no rope settings")
    convert(td, tmp_path / "fixed", "megatron", rope_from=tiny_dir / "devstral-hf" / "config.json", progress=False)
    assert read_meta(tmp_path / "fixed").model.decoder.rope.theta == 1e8


def test_partial_or_altered_checkpoint_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    td = tmp_path / "td"
    convert(tiny_dir / "devstral-hf", td, "megatron", progress=False)
    partial = tmp_path / ".td2.partial-12345"
    shutil.copytree(td, partial)
    with pytest.raises(CheckpointError, match="partial"):
        read_meta(partial)
    with open(td / "release" / "__0_0.distcp", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: expected \d+ bytes, found 1000"):
        read_meta(td)


def test_cli_prints_one_line_and_exits_nonzero(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert.py"),
            "--input",
            str(tiny_dir / "voxtral-hf"),
            "--output",
            str(out),
            "--to",
            "megatron",
            "--tp",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: --tp 3 --pp 1 not allowed")
    assert not out.exists()


def test_tokenizer_that_differs_from_metadata_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    td = tmp_path / "td"
    convert(tiny_dir / "voxtral-hf", td, "megatron", progress=False)
    tok = td / "release" / "tekken.json"
    data = tok.read_bytes()
    tok.write_bytes(data.replace(b"[AUDIO]", b"[AUDIX]"))  # same size, other content
    with pytest.raises(CheckpointError, match="tekken.json: sha256 differs"):
        read_meta(td)
