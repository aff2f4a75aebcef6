"""Megatron-LM's checkpoint layout around a torch_dist directory, read and written.

Megatron-LM (and Megatron-Bridge) `--load DIR` reads `DIR/latest_checkpointed_iteration.txt` (an iteration
number or `release`), then the torch_dist files in `DIR/iter_NNNNNNN/` or `DIR/release/`, and takes
`iteration`, `checkpoint_version` and the `args` namespace from the common state (`common.pt`). Our
`checkpoint_meta.json` and `tekken.json` live in the iteration directory too, so each one is a complete
checkpoint for our tools; the older flat layout (`.metadata` at the top) is still read.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from megatron_ext.checkpoint.atomic import LOCK_FILE, RESUME_FILE, CheckpointError, write_atomic
from megatron_ext.config import ModelConfig

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version (QKV layout of torch_dist checkpoints)
ITER_RE = re.compile(r"^iter_(\d{7})$")
GPT_PREFIX = "language_model."  # our AudioLanguageModel's decoder keys = GPTModel keys under this prefix
# GPTModel norm keys of specs without Megatron-Core's sharded_state_dict_keys_map (separate norm modules)
GPT_NORM_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def iteration_name(iteration: int | str) -> str:
    """Directory name of an iteration: `release` or `iter_NNNNNNN`."""
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def write_tracker(root: Path, iteration: int | str) -> None:
    """`root/latest_checkpointed_iteration.txt` naming `iteration` (as Megatron-LM writes it: no newline)."""
    write_atomic(Path(root) / TRACKER, str(iteration).encode())


def tracked_iteration(root: Path) -> Path:
    """The iteration directory the tracker of `root` names; refuses a bad tracker or a missing directory."""
    tracker = Path(root) / TRACKER
    try:
        text = tracker.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{tracker}: cannot read the iteration tracker ({exc})") from None
    if text != RELEASE and not (text.isdigit() and len(text) <= 7):
        raise CheckpointError(f"{tracker}: holds {text[:40]!r}, not an iteration number or 'release'")
    target = Path(root) / iteration_name(text)
    if not target.is_dir():
        raise CheckpointError(f"{tracker}: names iteration {text!r} but {target.name}/ does not exist")
    return target


def resolve(directory: Path) -> Path:
    """The directory holding the checkpoint files: `directory` itself (an iteration directory or the older flat
    layout) or the iteration its tracker names. A top directory with iterations but no tracker is refused."""
    d = Path(directory)
    if (d / TRACKER).is_file():
        return tracked_iteration(d)
    if (d / ".metadata").is_file() or not d.is_dir():
        return d
    iterations = sorted(p.name for p in d.iterdir() if p.is_dir() and (ITER_RE.match(p.name) or p.name == RELEASE))
    if iterations:
        raise CheckpointError(
            f"{d}: holds {iterations[-1]}/ but no {TRACKER} (Megatron-LM layout without its tracker); pass the "
            f"iteration directory itself, e.g. {d / iterations[-1]}"
        )
    return d


def move_into_release(tmp: Path) -> None:
    """Turn a flat torch_dist output in `tmp` into Megatron-LM's layout: every file into `tmp/release/`, then
    the tracker naming it (the partial directory's bookkeeping files stay where `atomic_dir` expects them)."""
    release = tmp / RELEASE
    release.mkdir()
    for p in sorted(tmp.iterdir()):
        if p.is_file() and p.name not in (LOCK_FILE, RESUME_FILE):
            p.rename(release / p.name)
    write_tracker(tmp, RELEASE)


def gpt_key(name: str) -> str:
    """Our decoder tensor name -> Megatron-LM GPTModel key (`language_model.` dropped)."""
    if not name.startswith(GPT_PREFIX):
        raise CheckpointError(f"{name}: not a language-model tensor; GPTModel checkpoints hold the decoder only")
    return name.removeprefix(GPT_PREFIX)


def megatron_lm_args(cfg: ModelConfig, tp: int = 1, pp: int = 1, **extra: Any) -> argparse.Namespace:
    """The `args` namespace Megatron-LM saves in the common state, with the decoder's architecture in
    Megatron-LM's argument names (what `--use-checkpoint-args` and `check_checkpoint_args` read)."""
    d, rope = cfg.decoder, cfg.decoder.rope
    args: dict[str, Any] = {
        "num_layers": d.num_layers,
        "hidden_size": d.hidden_size,
        "ffn_hidden_size": d.ffn_hidden_size,
        "num_attention_heads": d.num_attention_heads,
        "num_query_groups": d.num_query_groups,
        "group_query_attention": d.num_query_groups != d.num_attention_heads,
        "kv_channels": d.kv_channels,
        "padded_vocab_size": d.vocab_size,
        "max_position_embeddings": d.max_position_embeddings,
        "position_embedding_type": "yarn" if rope.type == "yarn" else "rope",
        "add_position_embedding": False,
        "rotary_base": rope.theta,
        "rotary_percent": 1.0,
        "rotary_interleaved": False,
        "normalization": "RMSNorm",
        "norm_epsilon": d.norm_eps,
        "swiglu": True,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "untie_embeddings_and_output_weights": True,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "ckpt_format": "torch_dist",
        "use_dist_ckpt": True,
    }
    if rope.type == "yarn":
        args |= {
            "yarn_rotary_scaling_factor": rope.factor,
            "yarn_original_max_position_embeddings": rope.original_max_position_embeddings,
            "yarn_beta_fast": rope.beta_fast,
            "yarn_beta_slow": rope.beta_slow,
            "yarn_mscale": rope.mscale,
            "yarn_mscale_all_dim": rope.mscale_all_dim,
            "yarn_correction_range_round_to_int": rope.truncate,
        }
    return argparse.Namespace(**(args | extra))


def common_state(cfg: ModelConfig, iteration: int, tp: int = 1, pp: int = 1, **args: Any) -> dict[str, Any]:
    """The common (non-sharded) state Megatron-LM reads: iteration, checkpoint_version and args."""
    return {
        "iteration": iteration,
        "checkpoint_version": CHECKPOINT_VERSION,
        "args": megatron_lm_args(cfg, tp, pp, iteration=iteration, **args),
    }


def safe_globals() -> list[Any]:
    """Classes `torch.load(weights_only=True)` may build from a Megatron-LM common state: the args namespace
    and Megatron-Core's plain enums found in it. Nothing that runs code on load."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer import enums

    found = [getattr(enums, n) for n in ("AttnBackend", "AttnMaskType", "AttnType", "LayerType") if hasattr(enums, n)]
    return [argparse.Namespace, ModelType, *found]


def load_common(path: Path) -> dict[str, Any]:
    """`common.pt` through `torch.load(weights_only=True)` with `safe_globals()` allowed; anything else is one
    CheckpointError naming the file and what was refused."""
    import torch

    try:
        with torch.serialization.safe_globals(safe_globals()):
            common = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses any non-allow-listed global: one line, no traceback
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True) ({type(exc).__name__}: {first})"
        ) from None
    if not isinstance(common, dict):
        raise CheckpointError(f"{path}: common state is a {type(common).__name__}, not a dict")
    return common
