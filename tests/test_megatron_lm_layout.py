"""Megatron-LM's checkpoint layout, both ways, against Megatron-Core itself (2 gloo processes on CPU).

Reading: a Megatron-Core GPTModel (local spec, tiny Devstral geometry, random weights) at TP=2 saves itself
with `dist_checkpointing.save` as Megatron-LM does (`iter_0000007/` + `latest_checkpointed_iteration.txt`,
GPTModel keys, `iteration` / `checkpoint_version` / an args namespace holding a Megatron-Core enum in the
common state, no checkpoint_meta.json). `tools/convert.py` with --rope-from and --tokenizer converts it;
our AudioLanguageModel loads the conversion at TP=2 and TP=1 and gives the writer's logits.
Writing: `--to megatron-lm` (from that conversion and from the tiny Devstral HF) is read strictly
(StrictHandling.RAISE_ALL) by `dist_checkpointing.load` into a plain GPTModel, which gives the same logits.
Tolerance: max |logit difference| <= 1e-5 in fp32. Bad input: the tracker missing or naming a missing
iteration gives one `error:` line and no output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron_ext.checkpoint.convert import convert
from megatron_ext.checkpoint.megatron_lm import TRACKER, load_common, safe_globals
from megatron_ext.checkpoint.metadata import read_meta
from megatron_ext.checkpoint.source import open_checkpoint
from megatron_ext.compat.cpu import _free_port, cpu_only

sys.path.insert(0, str(Path(__file__).parent))

import convert_megatron_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_only(), reason="CPU (gloo) variant")
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _megatron_lm_args(cfg) -> argparse.Namespace:
    """The args Megatron-LM pretrain_gpt.py would hold for this model (an enum among them, as in real runs)."""
    from megatron.core.transformer.enums import AttnBackend

    d = cfg.decoder
    return argparse.Namespace(
        num_layers=d.num_layers,
        hidden_size=d.hidden_size,
        num_attention_heads=d.num_attention_heads,
        group_query_attention=True,
        num_query_groups=d.num_query_groups,
        kv_channels=d.kv_channels,
        norm_epsilon=d.norm_eps,
        tensor_model_parallel_size=2,
        attention_backend=AttnBackend.auto,
        iteration=7,
    )


def _gpt_logits_from(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    """A plain GPTModel loads `ckpt` (an iteration directory) strictly; its gathered logits."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    model = worker.build_gpt(read_meta(ckpt).model)
    with torch.serialization.safe_globals(safe_globals()):  # as Megatron-LM allows its args namespace
        loaded = dist_checkpointing.load(
            {"model": model.sharded_state_dict()}, str(ckpt), strict=StrictHandling.RAISE_ALL
        )
    assert loaded["checkpoint_version"] == 3.0 and loaded["args"].num_layers == model.config.num_layers
    model.load_state_dict(loaded["model"])
    return worker.megatron_logits(model.eval(), ids)


def _ours_logits_from(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    from megatron_ext.models.build import BuildConfig, build_model
    from megatron_ext.models.loading import load_checkpoint

    model = build_model(read_meta(ckpt).model, BuildConfig(backend="local", init_weights=False)).eval()
    load_checkpoint(model, ckpt)
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None], runtime_gather_output=True)[0]


def _worker(rank: int, world: int, port: int, tiny_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_ext.compat.cpu import destroy_distributed, init_distributed
    from megatron_ext.testing.tiny_models import DEVSTRAL

    tiny, out = Path(tiny_dir), Path(out_dir)
    foreign, ours, lm, lm_hf = out / "mlm-run", out / "ours", out / "ours-to-mlm", out / "hf-to-mlm"
    results: dict[str, float] = {}
    init_distributed(tp=2, pp=1)
    torch.manual_seed(0)
    writer = worker.build_gpt(DEVSTRAL).eval()
    ids = worker.tokens(DEVSTRAL.decoder.vocab_size)
    ref = worker.megatron_logits(writer, ids)[0]
    if rank == 0:
        (foreign / "iter_0000007").mkdir(parents=True)
    dist.barrier()
    common = {"iteration": 7, "checkpoint_version": 3.0, "args": _megatron_lm_args(DEVSTRAL)}
    dist_checkpointing.save({"model": writer.sharded_state_dict(), **common}, str(foreign / "iter_0000007"))
    if rank == 0:
        (foreign / TRACKER).write_text("7")
        shutil.copy(tiny / "devstral-hf" / "tekken.json", out / "tekken.json")
        cmd = [sys.executable, str(ROOT / "tools" / "convert.py"), "--input", str(foreign), "--no-progress"]
        run = [*cmd, "--output", str(ours), "--to", "megatron", "--tp", "2", "--rope-from"]
        subprocess.run(
            [*run, str(tiny / "devstral-hf" / "config.json"), "--tokenizer", str(out / "tekken.json")], check=True
        )
        convert(ours, lm, "megatron-lm", progress=False)
        convert(tiny / "devstral-hf", lm_hf, "megatron-lm", progress=False)
    dist.barrier()
    results["ours_tp2"] = (_ours_logits_from(ours, ids) - ref).abs().max().item()
    results["gpt_tp2"] = (_gpt_logits_from(lm / "release", ids)[0] - ref).abs().max().item()
    init_distributed(tp=1, pp=1)
    results["ours_tp1"] = (_ours_logits_from(ours, ids) - ref).abs().max().item()
    hf = worker.hf_logits(tiny / "devstral-hf", ids)[0]
    results["gpt_from_hf_tp1"] = (_gpt_logits_from(lm_hf / "release", ids)[0] - hf).abs().max().item()
    destroy_distributed()
    (out / f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def megatron_lm_run(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("megatron-lm")
    mp.start_processes(_worker, args=(2, _free_port(), str(tiny_dir), str(out)), nprocs=2, start_method="spawn")
    return out


def test_megatron_lm_checkpoint_converts_loads_at_tp1_tp2_with_the_writers_logits(megatron_lm_run: Path) -> None:
    for rank in range(2):
        res = json.loads((megatron_lm_run / f"rank{rank}.json").read_text())
        for key in ("ours_tp2", "ours_tp1", "gpt_tp2", "gpt_from_hf_tp1"):
            assert res[key] <= TOL, (rank, key, res[key])
    meta = read_meta(megatron_lm_run / "ours")
    assert meta.model.decoder.num_query_groups == 2 and meta.model.encoder is None
    assert meta.extra["input_format"] == "torch_dist"


def test_exports_carry_megatron_lm_common_state_and_tracker(megatron_lm_run: Path) -> None:
    for name in ("ours", "ours-to-mlm"):
        top = megatron_lm_run / name
        assert (top / TRACKER).read_text() == "release"
        assert sorted(p.name for p in top.iterdir()) == sorted([TRACKER, "release"])
        common = load_common(top / "release" / "common.pt")
        assert common["iteration"] == 0 and common["checkpoint_version"] == 3.0
        assert common["args"].num_query_groups == 2 and common["args"].ckpt_format == "torch_dist"
    with open_checkpoint(megatron_lm_run / "ours-to-mlm") as src:  # GPTModel keys, read under ours
        assert "Megatron-LM GPTModel keys" in src.description
        assert "language_model.output_layer.weight" in src.names


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), *args, "--no-progress"], capture_output=True, text=True
    )


def _one_error_line(proc: subprocess.CompletedProcess, *parts: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_megatron_lm_checkpoint_needs_rope_and_tokenizer(megatron_lm_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _one_error_line(
        _cli("--input", str(megatron_lm_run / "mlm-run"), "--output", str(out), "--to", "hf"),
        "checkpoint_meta.json",
        "--rope-from",
        "--tokenizer",
    )
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    partial = tmp_path / ".mlm.partial-host-1"  # no metadata of ours says it is unfinished: the name does
    shutil.copytree(megatron_lm_run / "mlm-run", partial)
    _one_error_line(_cli("--input", str(partial), "--output", str(out), "--to", "hf"), str(partial), "partial")


def test_bad_trackers_are_refused_in_one_line(megatron_lm_run: Path, tiny_dir: Path, tmp_path: Path) -> None:
    rope = [
        "--rope-from",
        str(tiny_dir / "devstral-hf" / "config.json"),
        "--tokenizer",
        str(megatron_lm_run / "tekken.json"),
    ]
    no_tracker = tmp_path / "no-tracker"
    shutil.copytree(megatron_lm_run / "mlm-run", no_tracker)
    (no_tracker / TRACKER).unlink()
    out = tmp_path / "out"
    _one_error_line(
        _cli("--input", str(no_tracker), "--output", str(out), "--to", "megatron", *rope),
        str(no_tracker),
        "iter_0000007/",
        TRACKER,
    )
    (no_tracker / TRACKER).write_text("9")
    _one_error_line(
        _cli("--input", str(no_tracker), "--output", str(out), "--to", "megatron", *rope),
        TRACKER,
        "'9'",
        "iter_0000009/ does not exist",
    )
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # the iteration directory itself is a checkpoint without its parent's tracker
    ok = _cli("--input", str(no_tracker / "iter_0000007"), "--output", str(out), "--to", "megatron", *rope)
    assert ok.returncode == 0, ok.stderr


def test_old_flat_layout_still_reads(megatron_lm_run: Path, tmp_path: Path) -> None:
    """Checkpoints written before the release/ layout: every file at the top, no tracker."""
    flat = tmp_path / "flat"
    shutil.copytree(megatron_lm_run / "ours" / "release", flat)
    with open_checkpoint(flat) as old, open_checkpoint(megatron_lm_run / "ours") as new:
        assert old.names == new.names and old.cfg == new.cfg
        for name in new.names:
            assert torch.equal(old.get(name), new.get(name)), name


def test_training_resume_follows_the_tracker_or_an_old_runs_latest_file(tmp_path: Path) -> None:
    from megatron_ext.checkpoint.atomic import CheckpointError
    from megatron_ext.training.checkpointing import latest_checkpoint

    for step in (2, 4):
        (tmp_path / f"iter_{step:07d}").mkdir()
    assert latest_checkpoint(tmp_path) is None  # nothing published yet
    (tmp_path / "latest").write_text("iter_0000002\n")  # a run saved before the tracker
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_0000002"
    (tmp_path / TRACKER).write_text("4")
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_0000004"
    (tmp_path / TRACKER).write_text("6")
    with pytest.raises(CheckpointError, match="names iteration '6' but iter_0000006/ does not exist"):
        latest_checkpoint(tmp_path)


def test_megatron_lm_keys_are_refused_for_a_model_with_audio(tiny_dir: Path, tmp_path: Path) -> None:
    from megatron_ext.checkpoint.atomic import CheckpointError

    with pytest.raises(CheckpointError, match="--to megatron-lm writes GPTModel keys, for text-only models"):
        convert(tiny_dir / "voxtral-hf", tmp_path / "out", "megatron-lm", progress=False)
    assert list(tmp_path.iterdir()) == []
