"""SFT on Megatron-Core, tiny Voxtral-layout model on CPU: training, resume, TensorBoard, frozen encoder,
per-document attention under packing, startup refusals and config schema. Multi-rank runs are `slow`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sft_runs import full_and_resumed, read_scalars, sft_env
from sft_runs import run_overrides as overrides

from megatron_ext.training.config import TrainConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TB_SCALARS = {
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_s",
    "train/tflops_per_gpu",
    "train/memory_gb",
    "train/audio_tokens",
    "train/text_tokens",
    "train/loss_text",
    "val/loss",
}


@pytest.fixture(scope="module")
def env(tiny_dir: Path, tmp_path_factory) -> dict[str, Path]:
    return sft_env(tiny_dir, tmp_path_factory.mktemp("sft"))


def tiny_cfg(env: dict[str, Path], run: str, **extra: object):
    return load_config(ROOT / "examples/configs/tiny_cpu.yaml", overrides(env, run, **extra))


# ---- config schema and startup refusals (no training) ---------------------------------------------------
def test_config_rejects_unknown_and_ill_typed_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {checkpoint: x}\ndata: {sources: [{name: a, path: p}]}\ntraining: {seq_lenght: 8}\n")
    with pytest.raises(TrainConfigError, match=r"training.seq_lenght"):
        load_config(cfg)
    cfg.write_text("model: {checkpoint: x}\ndata: {sources: [{name: a, path: p}]}\n")
    with pytest.raises(TrainConfigError, match=r"^optimizer.lr: Value 'fast'"):
        load_config(cfg, ["optimizer.lr=fast"])
    with pytest.raises(TrainConfigError, match=r"^data.sources.0.colour: unknown setting"):
        load_config(cfg, ["data.sources.0.colour=red"])
    with pytest.raises(TrainConfigError, match=r"^training.recompute: 'some'"):
        load_config(cfg, ["training.recompute=some"])
    assert load_config(cfg, ["training.seq_length=64"]).training.seq_length == 64


def test_example_configs_carry_the_recipe() -> None:
    paper = load_config(ROOT / "examples/configs/devstral_audio_sft.yaml")
    o, t, p, rope = paper.optimizer, paper.training, paper.parallel, paper.model.rope
    assert (o.lr, o.weight_decay, o.warmup_steps, o.min_lr_ratio, o.clip_grad) == (1e-6, 0.8, 100, 0.1, 20.0)
    assert t.seq_length == 131072 and 3.9e6 <= t.global_batch_size * t.seq_length <= 4.3e6
    assert (p.tensor_model_parallel_size, p.context_parallel_size) == (4, 1) and paper.model.freeze_encoder
    assert (rope.type, rope.factor, rope.beta_fast, rope.beta_slow, rope.theta) == ("yarn", 48, 32, 1, 1e8)
    assert t.bf16 and t.fp8 == "hybrid"
    ratios = {s.modality: s.ratio for s in paper.data.sources}
    assert ratios == {"text": 95, "audio": 5}
    assert load_config(ROOT / "examples/configs/tiny_cpu.yaml").parallel.tensor_model_parallel_size == 2


def test_startup_refusals(env: dict[str, Path], tmp_path: Path) -> None:
    from megatron_ext.training.checks import StartupError, startup_checks

    ckpt = tmp_path / "ckpt"
    shutil.copytree(env["ckpt"] / "release", ckpt)  # the iteration directory of the conversion: a checkpoint
    cfg = lambda *o: tiny_cfg(env, "x", **{"model.checkpoint": ckpt, **dict(x.split("=", 1) for x in o)})  # noqa: E731
    yarn = [
        "model.rope={type: yarn, theta: 1e8, factor: 48, original_max_position_embeddings: 8192, "
        "beta_fast: 32, beta_slow: 1, mscale: 1, mscale_all_dim: 1}"
    ]
    startup_checks(cfg())  # the converted checkpoint passes as it is
    with pytest.raises(StartupError, match=r"model.rope disagrees .* on type, factor.*rope_override=true"):
        startup_checks(cfg(*yarn))
    model, _, _ = startup_checks(cfg(*yarn, "model.rope_override=true"))
    assert model.decoder.rope.factor == 48
    with pytest.raises(StartupError, match="tensor_model_parallel_size=4: the decoder's 2 KV groups need TP in"):
        startup_checks(cfg("parallel.tensor_model_parallel_size=4"))
    with pytest.raises(StartupError, match="size=8: the audio encoder's 4 attention heads need TP in"):
        startup_checks(cfg("parallel.tensor_model_parallel_size=8"))
    with pytest.raises(StartupError, match="context_parallel_size=2: Megatron-Core's local attention has no context"):
        startup_checks(cfg("parallel.context_parallel_size=2"), "local")
    other_tok = tmp_path / "tekken.json"
    other_tok.write_text((ckpt / "tekken.json").read_text().replace('"v7"', '"v3"'))
    with pytest.raises(StartupError, match=r"tekken.json: sha256 .* differs from the checkpoint's tokenizer"):
        startup_checks(cfg(f"model.tokenizer={other_tok}"))
    meta = json.loads((ckpt / "checkpoint_meta.json").read_text())
    del meta["model"]["decoder"]["rope"]
    (ckpt / "checkpoint_meta.json").write_text(json.dumps(meta))
    with pytest.raises(StartupError, match="no rope settings"):
        startup_checks(cfg())


# ---- training on the tiny model (one process) -----------------------------------------------------------
@pytest.fixture(scope="module")
def runs(env: dict[str, Path]):
    return full_and_resumed(lambda run, **extra: tiny_cfg(env, run, **extra), "full", "resumed")


def test_resume_continues_exactly(runs) -> None:
    full, resumed = runs
    assert resumed.resumed_from == 2 and sorted(resumed.losses) == [3, 4]
    assert [resumed.losses[s] for s in (3, 4)] == [full.losses[s] for s in (3, 4)]  # bit-identical, fp32 CPU
    assert full.losses[4] < full.losses[1]  # and it learns


def test_worker_processes_give_the_same_losses_and_resume_without_them(runs, env: dict[str, Path]) -> None:
    """data.num_workers=2 for 3 steps, then resumed with num_workers=0: every loss equals the in-process run's
    bit for bit (fp32 CPU)."""
    from megatron_ext.training.sft import train

    full, _ = runs
    workers = {"data.num_workers": 2, "data.prefetch": 4}
    first = train(tiny_cfg(env, "workers", **workers, **{"training.exit_after_iters": 3}))
    rest = train(tiny_cfg(env, "workers"))
    assert first.losses == {s: full.losses[s] for s in (1, 2, 3)}
    assert rest.resumed_from == 3 and rest.losses == {4: full.losses[4]}


def test_tensorboard_scalars_written(runs, env: dict[str, Path]) -> None:
    full, _ = runs
    scalars = read_scalars(env["root"] / "full" / "tb")
    assert TB_SCALARS <= set(scalars), TB_SCALARS - set(scalars)
    assert scalars["train/loss"] == pytest.approx(full.losses, rel=1e-6)
    assert scalars["val/loss"][4] == pytest.approx(full.validation[4], rel=1e-6)
    assert max(scalars["train/audio_tokens"].values()) >= 375  # the 50:50 mixture brought audio in
    assert all(v > 0 for v in scalars["train/tflops_per_gpu"].values())


def test_frozen_encoder_is_bit_identical_and_has_no_optimizer_state(runs, env: dict[str, Path]) -> None:
    from megatron_ext.checkpoint.megatron_lm import TRACKER, load_common
    from megatron_ext.checkpoint.torch_dist_io import TorchDistReader

    full, _ = runs
    assert full.frozen and all(n.startswith("audio_encoder.") for n in full.frozen)
    assert not any(n.startswith("audio_encoder.") for n in full.trainable)
    assert full.optimizer_state_numel == full.trainable_numel  # Adam state exactly for the trained params
    start, end = TorchDistReader(env["ckpt"]), TorchDistReader(env["root"] / "full" / "iter_0000004")
    names = start.names()
    encoder = [n for n in names if n.startswith("audio_encoder.")]
    assert encoder and all(torch.equal(start.get(n), end.get(n)) for n in encoder)
    head = "language_model.output_layer.weight"
    assert not torch.equal(start.get(head), end.get(head))  # while the decoder trained
    saved = sorted(p.name for p in (env["root"] / "full").iterdir() if p.name.startswith("iter_"))
    assert saved == ["iter_0000002", "iter_0000004"]  # keep_last=2 of 2 and 4
    assert (env["root"] / "full" / TRACKER).read_text() == "4"  # Megatron-LM's tracker
    common = load_common(env["root"] / "full" / "iter_0000004" / "common.pt")
    assert common["iteration"] == 4 and common["checkpoint_version"] == 3.0 and common["args"].iteration == 4
    assert common["args"].tensor_model_parallel_size == 1 and common["opt_param_scheduler"]["num_steps"] > 0
    assert "scheduler" not in common and common["extra"]["step"] == 4


def test_sft_checkpoint_exports_mistral_native(runs, env: dict[str, Path], tmp_path: Path) -> None:
    """An SFT checkpoint converts to the Mistral-native layout vLLM serves, tensors unchanged."""
    import json

    from megatron_ext.checkpoint.convert import convert
    from megatron_ext.checkpoint.source import open_checkpoint

    it = env["root"] / "full" / "iter_0000004"
    convert(it, tmp_path / "native", "mistral", progress=False)
    params = json.loads((tmp_path / "native" / "params.json").read_text())
    assert params["multimodal"]["whisper_model_args"]["encoder_args"]["audio_encoding_args"]["window_size"] == 400
    src, out = open_checkpoint(it), open_checkpoint(tmp_path / "native")
    head = "language_model.output_layer.weight"
    assert torch.equal(src.megatron().get(head), out.megatron().get(head))


# ---- packing: no attention across documents ------------------------------------------------------------
def test_packed_document_logits_equal_alone(env: dict[str, Path]) -> None:
    """A document's logits are the same packed between others or alone (fp32, atol 1e-5); a plain causal
    mask over the same packed row changes them (so the test can fail)."""
    from megatron_ext.audio.features import log_mel_chunks
    from megatron_ext.checkpoint.metadata import read_meta
    from megatron_ext.checkpoint.torch_dist_io import TorchDistReader
    from megatron_ext.compat.cpu import destroy_distributed, init_distributed
    from megatron_ext.data.chat import ChatEncoder, load_tokenizer
    from megatron_ext.data.packing import collate, document_causal_mask, pack
    from megatron_ext.data.sources import JsonlSource
    from megatron_ext.models.build import BuildConfig, build_model
    from megatron_ext.models.loading import load_full_tensors

    init_distributed(tp=1)
    try:
        model = build_model(read_meta(env["ckpt"]).model, BuildConfig(backend="local", init_weights=False))
        load_full_tensors(model, TorchDistReader(env["ckpt"]).get)
        model.eval()
        enc = ChatEncoder(load_tokenizer(env["ckpt"]), 375, 24)
        docs = [
            enc.encode(JsonlSource(env["text"])[0]),
            enc.encode(JsonlSource(env["audio"])[1]),
            enc.encode(JsonlSource(env["text"])[5]),
        ]
        mel = lambda w: log_mel_chunks(w)[0]  # noqa: E731

        def logits(seqs, mask_fn=document_causal_mask):
            b = collate(seqs, mel)
            with torch.no_grad():
                return model(b["tokens"], b["position_ids"], mask_fn(b["doc_ids"]), audio_features=b["mel"])

        packed = pack(docs, [0, 1, 0], 1024, 11)
        start = packed.doc_lens[0]
        n = len(docs[1]) - 1
        together = logits([packed])[0, start : start + n]
        alone = logits([pack([docs[1]], [1], n, 11)])[0]
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
        causal_only = lambda ids: ~torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()[None, None]  # noqa: E731
        plain = logits([packed], causal_only)
        assert (plain[0, start : start + n] - alone).abs().max() > 1e-3
    finally:
        destroy_distributed()


# ---- multi-rank runs (torchrun) --------------------------------------------------------------------------
def torchrun(nproc: int, args: list[str], timeout: int = 900) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(ROOT / "tools/train.py"),
        *args,
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_tp2_matches_tp1_for_5_steps(env: dict[str, Path]) -> None:
    """fp32 CPU: TP=2 (2 ranks, with and without sequence parallel) and TP=1 losses agree within 1e-4
    relative on every step, and so do the grad norms the optimizer clips by (TP-split weights count every
    rank's shard, replicated ones once)."""
    common = {"training.train_iters": 5, "logging.eval_interval": 0, "checkpoint.save_interval": 100}
    cfg = ["--config", str(ROOT / "examples/configs/tiny_cpu.yaml")]
    torchrun(1, cfg + overrides(env, "tp1", **common))
    torchrun(2, cfg + overrides(env, "tp2", **common, **{"parallel.tensor_model_parallel_size": 2}))
    torchrun(
        2,
        cfg
        + overrides(
            env, "tp2sp", **common, **{"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True}
        ),
    )
    tp1 = read_scalars(env["root"] / "tp1" / "tb")
    for run in ("tp2", "tp2sp"):
        other = read_scalars(env["root"] / run / "tb")
        for tag in ("train/loss", "train/grad_norm"):
            assert sorted(tp1[tag]) == sorted(other[tag]) == [1, 2, 3, 4, 5]
            for step, want in tp1[tag].items():
                assert abs(other[tag][step] - want) <= 1e-4 * abs(want), (run, tag, step, want, other[tag][step])


@pytest.mark.slow
def test_dp2_with_workers_trains_on_the_dp1_batches_and_stops_with_it(env: dict[str, Path]) -> None:
    """DP=2 (2 ranks, 1 worker each) vs DP=1 in-process, every source with an epoch budget: the same global
    batches, so the losses agree within 1e-6 relative, and both ranks stop with DP=1 when a stream runs out."""
    common = {
        "training.train_iters": 100,
        "logging.eval_interval": 0,
        "checkpoint.save_interval": 100,
        "data.sources.0.epochs": 1.0,
    }
    cfg = ["--config", str(ROOT / "examples/configs/tiny_cpu.yaml")]
    torchrun(1, cfg + overrides(env, "dp1", **common))
    torchrun(2, cfg + overrides(env, "dp2", **common, **{"data.num_workers": 1}))
    dp1, dp2 = (read_scalars(env["root"] / run / "tb")["train/loss"] for run in ("dp1", "dp2"))
    assert 5 < len(dp1) < 100 and sorted(dp1) == sorted(dp2)
    for step in dp1:
        assert abs(dp2[step] - dp1[step]) <= 1e-6 * abs(dp1[step]), (step, dp1[step], dp2[step])


@pytest.mark.slow
def test_make_sft_style_run_loss_falls_over_50_steps(env: dict[str, Path]) -> None:
    """The tiny CPU recipe (2 ranks, TP=2, 50 steps): the loss falls; TensorBoard has every scalar."""
    cfg = ["--config", str(ROOT / "examples/configs/tiny_cpu.yaml")]
    torchrun(
        2,
        cfg
        + overrides(
            env,
            "fifty",
            **{
                "training.train_iters": 50,
                "parallel.tensor_model_parallel_size": 2,
                "training.seq_length": 1024,
                "optimizer.warmup_steps": 5,
                "checkpoint.save_interval": 25,
                "logging.eval_interval": 25,
            },
        ),
    )
    scalars = read_scalars(env["root"] / "fifty" / "tb")
    assert TB_SCALARS <= set(scalars)
    loss = scalars["train/loss"]
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(46, 51)) / 5
    assert last < 0.7 * first, (first, last)
    assert scalars["val/loss"][50] < scalars["val/loss"][25]


# ---- FLOPs convention, launch scripts, GPU script (CPU side) ---------------------------------------------
def test_flops_per_token_matches_the_causal_convention() -> None:
    """Mistral Small 3 at s=131072, LM head on every token: ~266 GFLOP/token, 48% attention (FACTS.md 7)."""
    from benchmarks.sft_gpu import slice_config
    from megatron_ext.training.metrics import step_flops

    cfg = slice_config(layers=40, encoder_layers=0)
    s = 131072
    per_token = step_flops(cfg, [s], supervised=s, audio_chunks=0) / s
    attention = 6 * 40 * s * 4096
    assert per_token == pytest.approx(266e9, rel=0.01)
    assert attention / per_token == pytest.approx(0.48, abs=0.01)
    assert step_flops(cfg, [s // 2] * 2, s, 0) < step_flops(cfg, [s], s, 0)  # packing halves attention work


def _script(env_vars: dict[str, str], script: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "launch_scripts" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable, **env_vars},
    )


def test_launch_scripts_dry_run_validate_the_config(env: dict[str, Path]) -> None:
    config = str(ROOT / "examples/configs/tiny_cpu.yaml")
    ok = _script(
        {"DRY_RUN": "1", "NPROC": "2", "CONFIG": config},
        "train_single_node.sh",
        overrides(env, "dry", **{"parallel.tensor_model_parallel_size": 2}),
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "world 2 = TP 2 x CP 1 x DP 1" in ok.stdout and ok.stdout.strip().endswith("dry run OK")
    bad = _script(
        {"DRY_RUN": "1", "CONFIG": config},
        "train_slurm.sbatch",
        overrides(env, "dry", **{"parallel.tensor_model_parallel_size": 2}),
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: training.global_batch_size=2 is not a multiple of micro_batch_size x data-parallel size = 64"
    )


def test_dry_run_checks_every_row_and_the_world_size(env: dict[str, Path], tmp_path: Path) -> None:
    """A malformed row past the first, or a world size <= 0, stops the dry run (training would fail later)."""
    from megatron_ext.training.checks import StartupError
    from megatron_ext.training.sft import dry_run

    rows = env["text"].read_text().splitlines()
    bad = tmp_path / "text.jsonl"
    bad.write_text("\n".join([*rows[:5], json.dumps({"messages": [{"role": "user", "content": 3}]}), *rows[5:]]) + "\n")
    assert any("all valid" in line for line in dry_run(tiny_cfg(env, "dry-ok"), 1))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: sample 5: cannot encode chat"):
        dry_run(tiny_cfg(env, "dry-bad", **{"data.sources.0.path": bad}), 1)
    with pytest.raises(StartupError, match="world size 0: must be >= 1"):
        dry_run(tiny_cfg(env, "dry-world"), 0)


def test_gpu_bench_plans_on_cpu_and_refuses_to_run_without_cuda() -> None:
    tool = str(ROOT / "tools/sft_gpu_bench.py")
    check = subprocess.run(
        [sys.executable, tool, "--check", "--layers", "40", "--seq-length", "131072", "--docs", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    plan = json.loads(check.stdout)
    assert plan["full_logits_gb_tp1"] == 64.0 and plan["chunked_loss_peak_gb_tp1"] == 6.0
    if not torch.cuda.is_available():
        run = subprocess.run([sys.executable, tool, "--steps", "1"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "needs CUDA" in run.stderr


@pytest.mark.gpu
def test_gpu_bench_te_fp8_slice() -> None:
    """On one H100/H200: a few TE/FP8 steps of a full-width 2-layer slice run and report sane figures."""
    from benchmarks.sft_gpu import run

    result = run(layers=2, encoder_layers=1, seq_length=8192, docs=2, audio_chunks=1, steps=2, warmup=1)
    assert result["backend"] == "te" and result["tokens_per_s"] > 0 and 0 < result["peak_memory_gb"] < 80
