"""SFT across parallel layouts on the tiny Voxtral (fp32, CPU, gloo): pipeline parallelism against PP=1, optimizer
checkpoints resumed at another TP or PP, older dp_reshardable checkpoints, and gradient-accumulation fusion's
resolution. Runs of several ranks spawn one process per rank calling `train` (so every rank's losses are
seen) and are `slow`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from sft_runs import read_scalars, run_overrides, sft_env

from megatron_ext.compat.cpu import _free_port
from megatron_ext.training.checks import StartupError, gradient_accumulation_fusion
from megatron_ext.training.config import TrainConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
PP_TOL = 1e-6  # absolute, per step: PP only moves the same fp32 activations between processes
RESHARD_TOL = 1e-5  # relative, per step: the two checkpoints come from TP=1 and TP=2 (PP=1 and PP=2) arithmetic


@pytest.fixture(scope="module")
def env(tiny_dir: Path, tmp_path_factory) -> dict[str, Path]:
    return sft_env(tiny_dir, tmp_path_factory.mktemp("sft-parallel"))


def overrides(env: dict[str, Path], run: str, **extra: object) -> list[str]:
    """Five steps of the tiny recipe with a 80:400 text:audio mixture (audio in nearly every step's batch)."""
    settings = {"data.sources.1.ratio": 400, "training.train_iters": 5, "logging.eval_interval": 0}
    return run_overrides(env, run, **{**settings, **extra})


def _rank(rank: int, world: int, port: int, args: list[str], out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from megatron_ext.training.sft import train

    result = train(load_config(ROOT / "examples/configs/tiny_cpu.yaml", args))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"losses": result.losses, "resumed_from": result.resumed_from}))


def spawn(env: dict[str, Path], world: int, run: str, **extra: object) -> list[dict]:
    """One training run over `world` processes; every rank's {losses, resumed_from}."""
    out = env["root"] / f"{run}-out-{_free_port()}"
    out.mkdir()
    args = overrides(env, run, **extra)
    mp.start_processes(_rank, args=(world, _free_port(), args, str(out)), nprocs=world, start_method="spawn")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return [{"losses": {int(k): v for k, v in r["losses"].items()}, "resumed_from": r["resumed_from"]} for r in ranks]


# ---- configuration (no training) -------------------------------------------------------------------------
def test_gradient_accumulation_fusion_resolution() -> None:
    """auto: on exactly with TE linears on a GPU and Apex's wgrad kernel; on elsewhere is refused; off is off."""
    assert gradient_accumulation_fusion("auto", "te", True, True) is True
    for backend, gpu, apex in (("local", False, False), ("local", True, True), ("te", True, False)):
        assert gradient_accumulation_fusion("auto", backend, gpu, apex) is False
        assert gradient_accumulation_fusion("off", backend, gpu, apex) is False
    assert gradient_accumulation_fusion("off", "te", True, True) is False
    with pytest.raises(StartupError, match=r"gradient_accumulation_fusion=on: needs Transformer Engine on a GPU"):
        gradient_accumulation_fusion("on", "local", False, False)
    with pytest.raises(StartupError, match=r"=on: needs Apex's fused_weight_gradient_mlp_cuda"):
        gradient_accumulation_fusion("on", "te", True, False)
    assert gradient_accumulation_fusion("on", "te", True, True) is True


def test_parallel_config_keys(env: dict[str, Path]) -> None:
    cfg = lambda **o: load_config(ROOT / "examples/configs/tiny_cpu.yaml", overrides(env, "cfg", **o))  # noqa: E731
    default = cfg()
    assert default.model.gradient_accumulation_fusion == "auto" and default.parallel.pipeline_model_parallel_size == 1
    # YAML 1.1 reads on/off as booleans: both spellings land on the switch's names
    assert cfg(**{"model.gradient_accumulation_fusion": "on"}).model.gradient_accumulation_fusion == "on"
    assert cfg(**{"model.gradient_accumulation_fusion": "false"}).model.gradient_accumulation_fusion == "off"
    with pytest.raises(TrainConfigError, match=r"^model.gradient_accumulation_fusion: 'fast' is not one of"):
        cfg(**{"model.gradient_accumulation_fusion": "fast"})
    with pytest.raises(TrainConfigError, match=r"^parallel.pipeline_model_parallel_size: must be >= 1, got 0"):
        cfg(**{"parallel.pipeline_model_parallel_size": 0})


def test_pipeline_layout_checks(env: dict[str, Path]) -> None:
    """PP must divide the decoder layers; the dry run counts PP into the layout."""
    from megatron_ext.training.checks import startup_checks
    from megatron_ext.training.sft import dry_run

    cfg = lambda **o: load_config(ROOT / "examples/configs/tiny_cpu.yaml", overrides(env, "dry", **o))  # noqa: E731
    with pytest.raises(StartupError, match=r"^parallel: pipeline_model_parallel_size=4: the decoder's 2 layers"):
        startup_checks(cfg(**{"parallel.pipeline_model_parallel_size": 4}))
    text_only = {"data.sources.1.path": env["text"]}  # the layout line is the point here, not audio decoding
    pp2 = cfg(**{"parallel.pipeline_model_parallel_size": 2, "training.global_batch_size": 4, **text_only})
    assert any("world 8 = TP 1 x PP 2 x CP 1 x DP 4" in line for line in dry_run(pp2, 8))
    with pytest.raises(StartupError, match=r"^world size 3 is not a multiple of TP x CP x PP = 2$"):
        dry_run(pp2, 3)


def test_schedule_shape_flattens_thd() -> None:
    from megatron_ext.training.pipeline import schedule_shape

    assert schedule_shape(4096, 2, packed=False) == (4096, 2)
    assert schedule_shape(4096, 2, packed=True) == (8192, 1)


def test_dp_reshardable_checkpoint_resumes_at_its_layout_only(env: dict[str, Path], monkeypatch) -> None:
    """A checkpoint saved the old way (dp_reshardable, no content metadata) resumes at its own layout with the
    same next losses as an uninterrupted run (bit for bit); at another TP it is refused with one line."""
    from megatron_ext.checkpoint.megatron_lm import load_common
    from megatron_ext.training import checkpointing
    from megatron_ext.training.sft import train

    cfg = lambda run, **o: load_config(ROOT / "examples/configs/tiny_cpu.yaml", overrides(env, run, **o))  # noqa: E731
    full = train(cfg("legacy-full", **{"training.train_iters": 3}))
    with monkeypatch.context() as m:
        m.setattr(checkpointing, "OPTIMIZER_FORMAT", "dp_reshardable")
        train(cfg("legacy", **{"training.train_iters": 3, "training.exit_after_iters": 2}))
    common_pt = env["root"] / "legacy" / "iter_0000002" / "common.pt"
    common = load_common(common_pt)
    assert common.pop("content_metadata")["distrib_optim_sharding_type"] == "dp_reshardable"
    torch.save(common, common_pt)  # as saved before the content metadata existed
    resumed = train(cfg("legacy", **{"training.train_iters": 3}))
    assert resumed.resumed_from == 2 and resumed.losses == {3: full.losses[3]}

    path = env["root"] / "legacy" / "iter_0000002"
    fmt, saved = checkpointing._saved_layout(path)
    assert (fmt, saved) == ("dp_reshardable", {"tp": 1, "pp": 1})
    with pytest.raises(StartupError, match=r"saved dp_reshardable at TP=1 PP=1 cannot resume at TP=2 PP=1"):
        checkpointing._check_reshardable(path, fmt, saved, {"tp": 2, "pp": 1, "dp": 1})
    checkpointing._check_reshardable(path, fmt, saved, {"tp": 1, "pp": 1, "dp": 2})  # DP may change


# ---- multi-rank runs ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pp2_matches_pp1_and_every_rank_logs_the_loss(env: dict[str, Path]) -> None:
    """PP=2 (2 stages, 2 micro-batches in 1F1B) vs PP=1: losses within PP_TOL on each of 5 steps, with audio in
    4 of the 5 steps' batches (the encoder runs on stage 0, the loss on stage 1); both stages report the same
    losses."""

    pp1 = spawn(env, 1, "pp1")[0]["losses"]
    pp2 = spawn(env, 2, "pp2", **{"parallel.pipeline_model_parallel_size": 2})
    assert sorted(pp1) == sorted(pp2[0]["losses"]) == [1, 2, 3, 4, 5]
    assert pp2[0]["losses"] == pp2[1]["losses"]  # broadcast from the last stage
    for step, loss in pp1.items():
        assert abs(pp2[0]["losses"][step] - loss) <= PP_TOL, (step, loss, pp2[0]["losses"][step])
    audio = read_scalars(env["root"] / "pp2" / "tb")["train/audio_tokens"]
    assert sum(n >= 375 for n in audio.values()) >= 4, audio  # clips in (nearly) every step's batch


@pytest.mark.slow
def test_tp2_grad_norm_and_clipped_steps_match_tp1(env: dict[str, Path]) -> None:
    """With clipping active (clip_grad 0.5, below every step's norm), TP=2 and TP=1 report the same grad norm:
    within 1e-5 relative at step 1 (same weights, same batch) and RESHARD_TOL after it; the clipped updates
    then give the same losses within RESHARD_TOL."""

    clip = {"optimizer.clip_grad": 0.5, "training.train_iters": 3, "checkpoint.save_interval": 100}
    spawn(env, 1, "clip-tp1", **clip)
    spawn(env, 2, "clip-tp2", **clip, **{"parallel.tensor_model_parallel_size": 2})
    tp1, tp2 = (read_scalars(env["root"] / run / "tb") for run in ("clip-tp1", "clip-tp2"))
    assert sorted(tp1["train/grad_norm"]) == sorted(tp2["train/grad_norm"]) == [1, 2, 3]
    assert min(tp1["train/grad_norm"].values()) > 0.5  # every step clipped
    for tag in ("train/grad_norm", "train/loss"):
        for step, want in tp1[tag].items():
            tol = 1e-5 if step == 1 else RESHARD_TOL
            assert abs(tp2[tag][step] - want) <= tol * want, (tag, step, want, tp2[tag][step])


def _reshard(env: dict[str, Path], key: str, before: int, after: int) -> None:
    """Resume at `key`=`after` from a checkpoint saved at `before` and from one saved at `after` (world 2,
    step 2 of 5): the next three losses agree within RESHARD_TOL."""
    runs = {}
    for saved in (before, after):
        run = f"{key.split('.')[-1]}-{saved}-to-{after}"
        spawn(env, 2, run, **{key: saved, "training.exit_after_iters": 2})
        runs[saved] = spawn(env, 2, run, **{key: after})[0]
        assert runs[saved]["resumed_from"] == 2 and sorted(runs[saved]["losses"]) == [3, 4, 5]
    for step, loss in runs[after]["losses"].items():
        got = runs[before]["losses"][step]
        assert abs(got - loss) <= RESHARD_TOL * abs(loss), (key, step, loss, got)


@pytest.mark.slow
def test_resume_at_tp2_from_tp1_checkpoint(env: dict[str, Path]) -> None:
    _reshard(env, "parallel.tensor_model_parallel_size", 1, 2)


@pytest.mark.slow
def test_resume_at_pp2_from_pp1_checkpoint(env: dict[str, Path]) -> None:
    _reshard(env, "parallel.pipeline_model_parallel_size", 1, 2)
