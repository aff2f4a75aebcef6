"""Training checkpoints: model, optimizer, scheduler, RNG and data position in one torch_dist directory.

`SAVE_DIR/iter_NNNNNNN/` is a Megatron-Core `dist_checkpointing` (torch_dist) checkpoint whose model keys
are the naming contract's, plus `tekken.json` and `checkpoint_meta.json` (tool "sft"), so every saved step
is also a model checkpoint the other tools (convert, eval) read. The common state holds what Megatron-LM
reads (`iteration`, `checkpoint_version`, an `args` namespace; the scheduler under `opt_param_scheduler`)
next to ours (`extra`: data position, counters). It is written under rank 0's hidden
`.iter_NNNNNNN.partial-HOST-PID` name and published with `checkpoint.atomic.publish` (every file and
directory fsynced, renamed, the parent fsynced); stale partials follow `checkpoint/atomic.py`'s rules, but
no lock file is held inside (Megatron-Core warns about saving into a non-empty one).
`SAVE_DIR/latest_checkpointed_iteration.txt` names the newest step as Megatron-LM's tracker does (runs saved
before it have a `latest` file, still read on resume), and only the newest `keep_last` are kept. With
`async_save` the tensor writing runs in Megatron-Core's background writer and the publishing/metadata/cleanup
happen when the save is finalised (next steps or at exit).
Each saved step also holds the run's resolved `config.yaml` (when the trainer passes it).
A LoRA run (`model.lora`) saves only the adapters as model state (the frozen base stays in model.checkpoint,
reloaded on resume) with their optimizer state, plus `lora/`: the adapters as safetensors and
`adapter_config.json` (`checkpoint/lora.py`); its content metadata records the adapters' rank, alpha,
targets and base fingerprint, and a resume with other ones (or none) is refused.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from megatron_ext.checkpoint.atomic import partial_path, publish, remove_stale_partials
from megatron_ext.checkpoint.lora import ADAPTER_DIR, AdapterConfig, write_adapter
from megatron_ext.checkpoint.megatron_lm import (
    TRACKER,
    common_state,
    load_common,
    safe_globals,
    tracked_iteration,
    write_tracker,
)
from megatron_ext.checkpoint.metadata import CheckpointMeta, write_meta
from megatron_ext.checkpoint.torch_dist_io import TorchDistReader, check_torch_dist
from megatron_ext.models.lora import is_adapter_key
from megatron_ext.training.checks import StartupError

log = logging.getLogger(__name__)

ITER_RE = re.compile(r"^iter_(\d{7})$")
OLD_LATEST = "latest"  # the pointer file of runs saved before the Megatron-LM tracker
CONFIG_FILE = "config.yaml"  # the run's resolved configuration, in every saved step
# Distributed-optimizer state in model space ('fully_reshardable'): each parameter's fp32 copy and Adam moments
# under the parameter's own key and global shape, so a resume may change TP, PP and DP. Saving gathers a
# TP/PP shard's state over its DP group into host memory (12 bytes per parameter of the shard on every rank;
# at 24B and TP=4, ~72 GB per rank); loading reads the shard and keeps this rank's slice. Runs saved before
# it hold 'dp_reshardable' state (one tensor per DP buffer), resumable only at their own TP and PP. The
# format and the layout that saved it are the checkpoint's content metadata.
OPTIMIZER_FORMAT = "fully_reshardable"
LEGACY_OPTIMIZER_FORMAT = "dp_reshardable"


def iter_dir(save_dir: Path, step: int) -> Path:
    return save_dir / f"iter_{step:07d}"


def latest_checkpoint(save_dir: str | Path | None) -> Path | None:
    """The newest complete `iter_*` directory under save_dir (per Megatron-LM's tracker, or the `latest` file
    of older runs), or None when nothing was saved yet; a tracker naming a missing step is refused."""
    if save_dir is None:
        return None
    if (Path(save_dir) / TRACKER).is_file():
        return tracked_iteration(Path(save_dir))
    pointer = Path(save_dir) / OLD_LATEST
    if not pointer.is_file():
        return None
    path = Path(save_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def _layout() -> dict[str, int]:
    """This run's tensor/pipeline/data-parallel sizes."""
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_object() -> ShardedObject:
    """Every rank's RNG states; one grid cell per (TP, DP) rank, per (PP, TP, DP) rank under PP (at PP=1 the
    grid older checkpoints were saved with)."""
    tp, dp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank()
    tp_n, dp_n = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_data_parallel_world_size()
    pp, pp_n = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if pp_n == 1:
        return ShardedObject("rng_state", state, (tp_n, dp_n), (tp, dp), replica_id=0)
    return ShardedObject("rng_state", state, (pp_n, tp_n, dp_n), (pp, tp, dp), replica_id=0)


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _state(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    loading: bool,
    optimizer_format: str,
    rng: bool = True,
    adapters_only: bool = False,
) -> dict[str, Any]:
    """The sharded state dict saved (or, `loading`, the template loaded), the RNG states only with `rng`, the
    model's LoRA adapters alone with `adapters_only` (the frozen base is not duplicated)."""
    model_sd = model.sharded_state_dict()
    if adapters_only:
        model_sd = {k: v for k, v in model_sd.items() if is_adapter_key(k)}
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=loading, metadata={"distrib_optim_sharding_type": optimizer_format}
        ),
        "opt_param_scheduler": scheduler.state_dict(),  # Megatron-LM's name
    }
    if rng:
        state["rng_state"] = _rng_object()
    return state


def _saved_layout(path: Path) -> tuple[str, dict[str, int] | None]:
    """(optimizer format, layout that saved it) of a checkpoint; older ones: dp_reshardable, TP/PP from args."""
    common = load_common(path / "common.pt")
    content = common.get("content_metadata") or {}
    if "distrib_optim_sharding_type" in content:
        return content["distrib_optim_sharding_type"], content.get("layout")
    args = common.get("args")
    tp, pp = getattr(args, "tensor_model_parallel_size", None), getattr(args, "pipeline_model_parallel_size", None)
    return LEGACY_OPTIMIZER_FORMAT, None if tp is None or pp is None else {"tp": tp, "pp": pp}


def lora_record(lora: AdapterConfig | None) -> dict[str, Any] | None:
    """What must match between the adapters a checkpoint holds and the run resuming it."""
    if lora is None:
        return None
    return {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "targets": list(lora.targets),
        "base_fingerprint": lora.base_fingerprint,
    }


def _check_lora(path: Path, saved: dict[str, Any] | None, here: dict[str, Any] | None) -> None:
    """A LoRA checkpoint resumes only with the same adapters on the same base; a full one only without LoRA."""
    if saved == here:
        return
    if here is None:
        raise StartupError(
            f"{path}: holds LoRA adapters (rank {saved['rank']}, targets {saved['targets']}) and no base weights; "
            "resume it with the same model.lora (export merged weights with tools/convert.py --lora)"
        )
    if saved is None:
        raise StartupError(
            f"{path}: is a full SFT checkpoint; model.lora cannot resume it (drop model.lora, or give the LoRA "
            "run its own checkpoint.save_dir)"
        )
    diff = [k for k in here if saved.get(k) != here[k]]
    raise StartupError(
        f"{path}: its LoRA adapters differ from model.lora on {', '.join(diff)} (checkpoint "
        f"{', '.join(f'{k}={saved.get(k)}' for k in diff)}); resume with the same model.lora and model.checkpoint"
    )


def _check_reshardable(path: Path, optimizer_format: str, saved: dict[str, int] | None, here: dict[str, int]) -> None:
    """A dp_reshardable optimizer state resumes only at the TP and PP that saved it: refuse anything else."""
    if optimizer_format != LEGACY_OPTIMIZER_FORMAT:
        return
    if saved is None or (saved["tp"], saved["pp"]) != (here["tp"], here["pp"]):
        was = "an unknown layout" if saved is None else f"TP={saved['tp']} PP={saved['pp']}"
        raise StartupError(
            f"{path}: optimizer state saved {LEGACY_OPTIMIZER_FORMAT} at {was} cannot resume at "
            f"TP={here['tp']} PP={here['pp']}; resume it at its own layout once (the next save is reshardable)"
        )


class Checkpointer:
    """Saves (sync or async) with keep-last-N, and loads the newest checkpoint to resume."""

    def __init__(
        self,
        save_dir: str | None,
        keep_last: int,
        async_save: bool,
        meta: Callable[[], CheckpointMeta],
        tokenizer: Path,
        config_yaml: str | None = None,
        lora: AdapterConfig | None = None,
    ) -> None:
        self.save_dir = Path(save_dir) if save_dir else None
        self.keep_last, self.async_save = keep_last, async_save
        self.meta, self.tokenizer, self.config_yaml = meta, tokenizer, config_yaml
        self.lora = lora
        self.queue = AsyncCallsQueue() if async_save else None

    def save(self, step: int, model: Any, optimizer: Any, scheduler: Any, extra: dict[str, Any]) -> None:
        """Write step `step`; `extra` (data position, counters) goes in as common, rank-0 state."""
        assert self.save_dir is not None
        final = iter_dir(self.save_dir, step)
        tmp = _rank0_partial(final)
        if dist.get_rank() == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(final)
            tmp.mkdir()
        dist.barrier()
        tp, pp = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        common = common_state(self.meta().model, step, tp, pp)
        lora = self.lora is not None
        model_state = _state(model, optimizer, scheduler, False, OPTIMIZER_FORMAT, adapters_only=lora)
        state = {**model_state, **common, "extra": extra}
        content = {"distrib_optim_sharding_type": OPTIMIZER_FORMAT, "layout": _layout()}
        if lora:
            content["lora"] = lora_record(self.lora)
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=self.async_save, content_metadata=content)

        def finalize() -> None:
            dist.barrier()
            if dist.get_rank() == 0:
                self._publish(tmp, final, step)
            dist.barrier()

        if self.queue is None:
            finalize()
        else:
            request.add_finalize_fn(finalize)
            self.queue.schedule_async_request(request)

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
        shutil.copyfile(self.tokenizer, tmp / "tekken.json")
        if self.lora is not None:
            _write_adapters(tmp, self.lora)
        write_meta(tmp, self.meta())
        if self.config_yaml is not None:
            (tmp / CONFIG_FILE).write_text(self.config_yaml)
        publish(tmp, final)
        write_tracker(self.save_dir, step)
        steps = sorted(p for p in self.save_dir.iterdir() if ITER_RE.match(p.name))
        for old in steps[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def poll(self, blocking: bool = False) -> None:
        """Finalise async saves that finished (all of them when blocking)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()

    @staticmethod
    def load(
        path: Path, model: Any, optimizer: Any, scheduler: Any, lora: AdapterConfig | None = None
    ) -> dict[str, Any]:
        """Restore everything from `path`; returns its `extra` (data position, step, counters). Saved at another
        layout (TP/PP/DP), the RNG states are not restored (they belong to other ranks), as in Megatron-LM.
        With `lora` (the run's adapters) only the adapters and their optimizer state are read."""
        check_torch_dist(path)  # Megatron-Core unpickles .metadata freely: our allow-list reads it first
        optimizer_format, saved = _saved_layout(path)
        _check_lora(
            path, (load_common(path / "common.pt").get("content_metadata") or {}).get("lora"), lora_record(lora)
        )
        here = _layout()
        _check_reshardable(path, optimizer_format, saved, here)
        same = saved is not None and all(saved.get(k, here[k]) == v for k, v in here.items())
        template = _state(model, optimizer, scheduler, True, optimizer_format, rng=same, adapters_only=lora is not None)
        template["extra"] = None
        with torch.serialization.safe_globals(safe_globals()):  # Megatron-Core reads common.pt: args namespace
            loaded = dist_checkpointing.load(template, str(path))
        with torch.no_grad():  # fp32 main params are views of the (grad-requiring) model params
            model.load_state_dict(loaded["model"], strict=lora is None)  # LoRA: the adapters (all of them: above)
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(
            loaded["opt_param_scheduler"] if "opt_param_scheduler" in loaded else loaded["scheduler"]
        )
        if same:
            _restore_rng(loaded["rng_state"])
        elif dist.get_rank() == 0:
            log.info("%s: saved at %s, resumed at %s: RNG states not restored", path, saved, here)
        return loaded["extra"]


def _write_adapters(tmp: Path, lora: AdapterConfig) -> None:
    """`tmp/lora/`: the adapters as full tensors, read back from the torch_dist files just written (gathered
    over TP and PP for free), as safetensors with `adapter_config.json`."""
    reader = TorchDistReader(tmp)
    try:
        tensors = {name: reader.get(name) for name in reader.names() if is_adapter_key(name)}
    finally:
        reader.close()
    write_adapter(tmp / ADAPTER_DIR, tensors, lora)


def _rank0_partial(final: Path) -> Path:
    """Rank 0's partial directory for `final` (its host and pid), shared so every rank writes into it."""
    owner = [socket.gethostname(), os.getpid()] if dist.get_rank() == 0 else [None, None]
    dist.broadcast_object_list(owner, 0)
    return partial_path(final, *owner)
