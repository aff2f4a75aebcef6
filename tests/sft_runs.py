"""What the SFT tests share: the tiny Voxtral converted to torch_dist beside the tiny chat sets, the tiny CPU
recipe's overrides for one run (each test file passes the settings it differs in), an uninterrupted run beside
an interrupted and resumed one, and a run's TensorBoard scalars."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_ext.checkpoint.convert import convert
from megatron_ext.testing.tiny_chats import write_tiny_chats


def sft_env(tiny_dir: Path, root: Path) -> dict[str, Path]:
    """`root`, the start checkpoint `ckpt` and the chat files (`text`, `audio`, ...) under it."""
    convert(tiny_dir / "voxtral-hf", root / "voxtral-td", "megatron", progress=False)
    return {"root": root, "ckpt": root / "voxtral-td", **write_tiny_chats(root / "data", n_text=40, n_audio=10)}


def full_and_resumed(cfg: Callable[..., Any], full: str, resumed: str) -> tuple[Any, Any]:
    """An uninterrupted run `full`, and run `resumed` stopped after step 2 then resumed: their TrainResults.
    `cfg(run, **overrides)` builds a run's TrainConfig."""
    from megatron_ext.training.sft import train

    first = train(cfg(full))
    train(cfg(resumed, **{"training.exit_after_iters": 2}))
    return first, train(cfg(resumed))


def run_overrides(env: dict[str, Path], run: str, **settings: object) -> list[str]:
    """key=value overrides of examples/configs/tiny_cpu.yaml for run `run` under env's root: TP=1, a 50:50
    text:audio mixture, 4 steps of 512 tokens, saves every 2 and validation every 4 steps unless `settings`
    say otherwise."""
    base = {
        "model.checkpoint": env["ckpt"],
        "parallel.tensor_model_parallel_size": 1,
        "data.sources.0.path": env["text"],
        "data.sources.1.path": env["audio"],
        "data.sources.1.ratio": 50,
        "data.validation.0.path": env["text"],
        "training.seq_length": 512,
        "training.train_iters": 4,
        "optimizer.warmup_steps": 1,
        "checkpoint.save_dir": env["root"] / run,
        "checkpoint.save_interval": 2,
        "logging.tensorboard_dir": env["root"] / run / "tb",
        "logging.eval_interval": 4,
    }
    base.update(settings)
    return [f"{k}={v}" for k, v in base.items()]


def read_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """Every scalar tag of the TensorBoard event files in `directory`: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
