"""LoRA SFT on the tiny Voxtral (fp32, CPU, gloo): adapters only train and checkpoint, resume is exact, step 0 is
the base model, the merged export gives the adapters' logits, and bad settings are one-line refusals. Runs of
several ranks (TP=2 against TP=1) are `slow`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from sft_runs import full_and_resumed, run_overrides, sft_env

from megatron_ext.checkpoint.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from megatron_ext.checkpoint.lora_layout import adapter_shapes, trainable_count
from megatron_ext.checkpoint.metadata import read_meta
from megatron_ext.checkpoint.torch_dist_io import TorchDistReader
from megatron_ext.cli.convert import main as convert_main
from megatron_ext.training.checks import StartupError
from megatron_ext.training.config import TrainConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
LORA = {"model.lora": "{rank: 4, alpha: 8}", "logging.eval_interval": 0, "checkpoint.save_interval": 4}
MERGE_RTOL = 1e-5  # merged export vs base + adapters: max |difference| / max |logit|, fp32 (W + s B A rounding)


@pytest.fixture(scope="module")
def env(tiny_dir: Path, tmp_path_factory) -> dict[str, Path]:
    return sft_env(tiny_dir, tmp_path_factory.mktemp("lora"))


def lora_cfg(env: dict[str, Path], run: str, **extra: object):
    return load_config(ROOT / "examples/configs/tiny_cpu.yaml", run_overrides(env, run, **{**LORA, **extra}))


@pytest.fixture(scope="module")
def runs(env: dict[str, Path]):
    """A 4-step LoRA run, and the same run stopped after step 2 and resumed."""
    return full_and_resumed(lambda run, **extra: lora_cfg(env, run, **extra), "lora", "lora-resumed")


# ---- configuration (no training) -------------------------------------------------------------------------
def test_lora_config_keys_and_refusals(env: dict[str, Path]) -> None:
    cfg = lambda **o: load_config(ROOT / "examples/configs/tiny_cpu.yaml", run_overrides(env, "c", **o))  # noqa: E731
    assert cfg().model.lora is None  # off unless set
    lora = cfg(**{"model.lora": "{}"}).model.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (
        8,
        16.0,
        0.0,
        ["linear_qkv", "linear_proj", "projector"],
    )
    refusals = {
        "model.lora.targets: unknown target 'q_proj' \\(allowed: linear_qkv,": {"model.lora": "{targets: [q_proj]}"},
        "model.lora.rank: must be >= 1, got 0": {"model.lora": "{rank: 0}"},
        "model.lora.alpha: must be a finite number > 0": {"model.lora": "{alpha: -1}"},
        "model.lora.dropout: must be in \\[0, 1\\)": {"model.lora": "{dropout: 1.0}"},
        "model.lora.targets: lists a target twice": {"model.lora": "{targets: [projector, projector]}"},
        "model.freeze_encoder: false trains the encoder's weights, which model.lora": {
            "model.lora": "{}",
            "model.freeze_encoder": "false",
        },
        "model.freeze_projector: true contradicts": {"model.lora": "{}", "model.freeze_projector": "true"},
        "model.lora: adapters wrap Megatron-Core's local linears; set model.transformer_impl: local": {
            "model.lora": "{}",
            "model.transformer_impl": "transformer_engine",
        },
    }
    for message, settings in refusals.items():
        with pytest.raises(TrainConfigError, match="^" + message):
            cfg(**settings)


def test_train_cli_refuses_bad_lora_in_one_line(env: dict[str, Path], capsys) -> None:
    from megatron_ext.cli.train import main

    args = ["--config", str(ROOT / "examples/configs/tiny_cpu.yaml"), *run_overrides(env, "cli")]
    assert main([*args, "model.lora={rank: -2}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: model.lora.rank: must be >= 1, got -2"]


def test_trainable_counts_for_the_24b_shape() -> None:
    """The README's figures: rank 16 on attention + projector, and on every decoder linear + projector."""
    from megatron_ext.config import EncoderConfig, ModelConfig, mistral_small_decoder

    cfg = ModelConfig(
        mistral_small_decoder(),
        EncoderConfig(num_layers=32, hidden_size=1280, ffn_hidden_size=5120, num_attention_heads=20),
        audio_token_id=24,
        hf_architecture="voxtral",
    )
    # per layer: qkv 16 x (5120 + 6144), proj 16 x (4096 + 5120); projector 16 x (5120 + 5120) twice
    attention = 40 * 16 * (5120 + 6144 + 4096 + 5120) + 2 * 16 * 10240
    assert trainable_count(cfg, 16, ["linear_qkv", "linear_proj", "projector"]) == attention == 13_434_880
    mlp = 40 * 16 * (5120 + 65536 + 32768 + 5120)
    assert trainable_count(cfg, 16, ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "projector"]) == (
        attention + mlp
    )


# ---- training ----------------------------------------------------------------------------------------------
def test_only_adapters_train_and_resume_is_exact(runs, env: dict[str, Path]) -> None:
    full, resumed = runs
    assert resumed.resumed_from == 2 and sorted(resumed.losses) == [3, 4]
    assert [resumed.losses[s] for s in (3, 4)] == [full.losses[s] for s in (3, 4)]  # bit-identical, fp32 CPU
    assert full.trainable and all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in full.trainable)
    assert any(".base.weight" in n for n in full.frozen) and "language_model.output_layer.weight" in full.frozen
    cfg = read_meta(env["ckpt"]).model
    assert full.trainable_numel == trainable_count(cfg, 4, ["linear_qkv", "linear_proj", "projector"])
    assert full.optimizer_state_numel == full.trainable_numel  # no Adam state for the frozen base


def test_checkpoint_holds_adapters_not_the_base(runs, env: dict[str, Path]) -> None:
    step = env["root"] / "lora" / "iter_0000004"
    reader = TorchDistReader(step)
    try:
        names = reader.names()
        stored = {n: reader.get(n) for n in names}
    finally:
        reader.close()
    cfg = read_meta(env["ckpt"]).model
    shapes = adapter_shapes(cfg, 4, ["linear_qkv", "linear_proj", "projector"])
    assert {n: tuple(t.shape) for n, t in stored.items()} == shapes  # the model state is the adapters alone
    assert any(t.abs().max() > 0 for n, t in stored.items() if n.endswith("lora_b"))  # B moved off zero
    from safetensors.torch import load_file

    adapters = load_file(step / "lora" / ADAPTER_WEIGHTS)
    assert adapters.keys() == stored.keys() and all(torch.equal(adapters[n], stored[n]) for n in names)
    config = json.loads((step / "lora" / ADAPTER_CONFIG).read_text())
    assert (config["rank"], config["alpha"], config["scale"]) == (4, 8.0, 2.0)
    assert config["targets"] == ["linear_qkv", "linear_proj", "projector"]
    assert config["base_checkpoint"] == str(env["ckpt"]) and len(config["base_fingerprint"]) == 64
    assert read_meta(step).extra["lora"]["base_fingerprint"] == config["base_fingerprint"]


def test_resume_refusals(runs, env: dict[str, Path]) -> None:
    """A LoRA checkpoint resumes only with the same adapters; without model.lora it is refused (no base in it), and
    a full SFT checkpoint is not resumed with model.lora."""
    from megatron_ext.training.sft import train

    plain = load_config(
        ROOT / "examples/configs/tiny_cpu.yaml", run_overrides(env, "lora", **{"logging.eval_interval": 0})
    )
    with pytest.raises(StartupError, match=r"iter_0000004: holds LoRA adapters \(rank 4, .*\) and no base weights"):
        train(plain)
    with pytest.raises(StartupError, match=r"iter_0000004: its LoRA adapters differ from model.lora on rank, alpha"):
        train(lora_cfg(env, "lora", **{"model.lora": "{rank: 2, alpha: 4}"}))
    assert not (env["root"] / "lora" / "iter_0000005").exists()
    train(
        load_config(
            ROOT / "examples/configs/tiny_cpu.yaml", run_overrides(env, "full", **{"training.exit_after_iters": 1})
        )
    )
    with pytest.raises(StartupError, match=r"iter_0000001: is a full SFT checkpoint; model.lora cannot resume it"):
        train(lora_cfg(env, "full"))


# ---- step 0 and the merged export ----------------------------------------------------------------------------
def _logits(model: torch.nn.Module, cfg) -> torch.Tensor:
    """fp32 logits [s, vocab] of a fixed prompt with one audio chunk (projector adapters included)."""
    from megatron_ext.audio.features import audio_tokens_per_chunk

    per_chunk = audio_tokens_per_chunk(cfg.encoder.max_source_positions, cfg.projector_stack)
    ids = torch.tensor([[1, 3, *([cfg.audio_token_id] * per_chunk), 25, 7, 1100, 1200, 4]])
    mel = torch.randn(1, cfg.encoder.num_mel_bins, cfg.encoder.mel_frames, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, torch.arange(ids.shape[1])[None], audio_features=mel, runtime_gather_output=True)
    return out[0].float()


def test_step0_is_the_base_and_the_merged_export_matches(runs, env: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    from megatron_ext.compat.cpu import destroy_distributed, init_distributed
    from megatron_ext.models.build import BuildConfig, build_model
    from megatron_ext.models.loading import load_checkpoint, load_full_tensors
    from megatron_ext.models.lora import apply_lora

    step = env["root"] / "lora" / "iter_0000004"
    merged = env["root"] / "merged-hf"
    assert convert_main(["--input", str(env["ckpt"]), "--lora", str(step), "--output", str(merged), "--to", "hf"]) == 0
    base = TorchDistReader(env["ckpt"])
    cfg = read_meta(env["ckpt"]).model
    init_distributed(tp=1, pp=1)
    try:
        model = build_model(cfg, BuildConfig(backend="local", init_weights=False)).eval()
        load_full_tensors(model, base.get)
        before = _logits(model, cfg)
        apply_lora(model, 4, 8.0, 0.0, ["linear_qkv", "linear_proj", "projector"], seed=1234)
        assert torch.equal(_logits(model, cfg), before)  # B = 0: exactly the base model
        adapters = load_file(step / "lora" / ADAPTER_WEIGHTS)
        load_full_tensors(model, lambda n: adapters[n] if n in adapters else base.get(n))
        with_adapters = _logits(model, cfg)
        exported = build_model(cfg, BuildConfig(backend="local", init_weights=False)).eval()
        load_checkpoint(exported, merged)
        after = _logits(exported, cfg)
    finally:
        destroy_distributed()
        base.close()
    scale = with_adapters.abs().max()
    assert (with_adapters - before).abs().max() > 1e3 * MERGE_RTOL * scale  # the adapters change the logits
    assert (after - with_adapters).abs().max() <= MERGE_RTOL * scale


def test_merged_export_is_not_taken_for_a_plain_conversion(runs, env: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "merged-td"
    lora = ["--lora", str(env["root"] / "lora" / "iter_0000004")]
    assert convert_main(["--input", str(env["ckpt"]), *lora, "--output", str(out), "--to", "megatron"]) == 0
    capsys.readouterr()
    assert convert_main(["--input", str(env["ckpt"]), "--output", str(out), "--to", "megatron"]) == 2
    assert "already holds this conversion" not in capsys.readouterr().out


def test_merge_refusals(runs, env: dict[str, Path], tiny_dir: Path, tmp_path: Path, capsys) -> None:
    step = env["root"] / "lora" / "iter_0000004"

    def refused(*args: str) -> str:
        assert convert_main(["--output", str(tmp_path / "out"), "--to", "hf", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert not (tmp_path / "out").exists()
        return lines[0]

    assert "is a hf checkpoint" in refused("--input", str(tiny_dir / "voxtral-hf"), "--lora", str(step))
    other = tmp_path / "other-base"
    shutil.copytree(env["ckpt"], other)
    meta = other / "release" / "checkpoint_meta.json"
    meta.write_text(meta.read_text().replace('"tool": "convert"', '"tool": "convert "'))
    assert "is another checkpoint (fingerprint" in refused("--input", str(other), "--lora", str(step))
    adapter = tmp_path / "adapter"
    shutil.copytree(step / "lora", adapter)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, "targets": ["q_proj"]}))
    assert "targets must be a non-empty list from linear_qkv" in refused(
        "--input", str(env["ckpt"]), "--lora", str(adapter)
    )
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))
    with (adapter / ADAPTER_WEIGHTS).open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    assert "its sha256 differs" in refused("--input", str(env["ckpt"]), "--lora", str(adapter))
    assert "no adapter_config.json" in refused("--input", str(env["ckpt"]), "--lora", str(tmp_path))


# ---- tensor parallelism (several processes: slow) ---------------------------------------------------------------
TP_TOL = 1e-5  # relative, per step: TP=2 sums the same fp32 products in another order
# Adapters after 3 Adam steps: relative to the tensor's largest element. Early Adam updates are ~lr x sign(grad),
# so where a gradient is near zero the summation-order noise moves an element by up to ~3e-5 of the largest;
# a misplaced shard (wrong TP layout) would be off by ~100%.
ADAPTER_TOL = 1e-3


@pytest.mark.slow
def test_tp2_and_pp2_lora_match_tp1(env: dict[str, Path]) -> None:
    """Adapters on every target (SwiGLU fc1 and the row-parallel fc2 included) at TP=2, with and without sequence
    parallelism, and at PP=2 train as at TP=1 PP=1: the same losses and the same saved (gathered) adapters after
    3 steps."""
    from safetensors.torch import load_file
    from test_sft_parallel import spawn

    every = {"model.lora": "{rank: 4, alpha: 8, targets: [linear_qkv, linear_proj, linear_fc1, linear_fc2, projector]}"}
    settings = {**every, "training.train_iters": 3}
    tp2 = {"parallel.tensor_model_parallel_size": 2}
    runs = {
        "lora-tp1": spawn(env, 1, "lora-tp1", **settings)[0]["losses"],
        "lora-tp2": spawn(env, 2, "lora-tp2", **settings, **tp2)[0]["losses"],
        "lora-tp2sp": spawn(env, 2, "lora-tp2sp", **settings, **tp2, **{"parallel.sequence_parallel": True})[0][
            "losses"
        ],
        "lora-pp2": spawn(env, 2, "lora-pp2", **settings, **{"parallel.pipeline_model_parallel_size": 2})[0]["losses"],
    }
    adapters = {run: load_file(env["root"] / run / "iter_0000003" / "lora" / ADAPTER_WEIGHTS) for run in runs}
    for run in ("lora-tp2", "lora-tp2sp", "lora-pp2"):
        for step, loss in runs["lora-tp1"].items():
            assert abs(runs[run][step] - loss) <= TP_TOL * abs(loss), (run, step, loss, runs[run][step])
        assert adapters[run].keys() == adapters["lora-tp1"].keys()
        for name, want in adapters["lora-tp1"].items():
            got = adapters[run][name]
            assert (got - want).abs().max() <= ADAPTER_TOL * want.abs().max(), (run, name)


def test_adapter_dropout_acts_in_training_only(env: dict[str, Path]) -> None:
    """model.lora.dropout drops adapter inputs in training (two forwards differ), never in eval (identical)."""
    from megatron_ext.compat.cpu import destroy_distributed, init_distributed
    from megatron_ext.models.build import BuildConfig, build_model
    from megatron_ext.models.loading import load_checkpoint
    from megatron_ext.models.lora import LoraLinear, apply_lora

    cfg = read_meta(env["ckpt"]).model
    ids = torch.tensor([[1, 3, 25, 7, 1100, 1200, 4]])
    init_distributed(tp=1, pp=1)
    try:
        model = build_model(cfg, BuildConfig(backend="local", init_weights=False))
        load_checkpoint(model, env["ckpt"])
        apply_lora(model, 4, 8.0, 0.5, ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"], seed=1)
        for layer in (m for m in model.modules() if isinstance(m, LoraLinear)):
            torch.nn.init.normal_(layer.lora_b, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            train = [model(ids, torch.arange(7)[None]) for _ in range(2)]
            model.eval()
            evaluated = [model(ids, torch.arange(7)[None]) for _ in range(2)]
    finally:
        destroy_distributed()
    assert not torch.equal(*train) and torch.equal(*evaluated)


def test_projector_target_needs_an_audio_model(env: dict[str, Path], tiny_dir: Path) -> None:
    from megatron_ext.checkpoint.convert import convert
    from megatron_ext.training.sft import dry_run

    text_only = env["root"] / "devstral-td"
    convert(tiny_dir / "devstral-hf", text_only, "megatron", progress=False)
    cfg = lora_cfg(env, "text-only", **{"model.checkpoint": text_only})
    with pytest.raises(
        StartupError, match=r"^model.lora.targets: 'projector', but .*devstral-td has no audio projector"
    ):
        dry_run(cfg, 1)
