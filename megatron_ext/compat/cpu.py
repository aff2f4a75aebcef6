"""Run Megatron-Core 0.16.1 on a CPU-only torch (gloo): every patch it needs, in one place.

`apply_cpu_patches()` is a no-op when CUDA is available; otherwise it makes these paths work on CPU
(checked by tests/test_model_compat.py and the model/SFT tests): GPTModel with the local spec
(forward/backward, TP with and without sequence parallel, PP via `get_forward_backward_func`),
Megatron DDP + `get_megatron_optimizer` with and without the distributed optimizer, gradient clipping,
and `dist_checkpointing` save/load. What it patches, and why:

- CUDA RNG tracker: `torch.cuda.{get,set}_rng_state/manual_seed` and the tracker's private state
  helpers use the CPU generator, so `model_parallel_cuda_manual_seed` and `get_cuda_rng_tracker().fork()`
  work (the CPU generator is the one that dropout and init draw from on CPU).
- `torch.cuda.current_device()` returns 0, and a global `TorchFunctionMode` rewrites every CUDA device
  argument (`device="cuda"`, `torch.device("cuda")`, an int index, `.cuda()`, `.to("cuda")`) to CPU:
  Megatron has such literals in the causal mask, schedules, DDP buffers, optimizer and clip_grads.
- `torch.cuda.synchronize/empty_cache` are no-ops; `Stream/Event/current_stream/default_stream/stream`
  are inert stand-ins (timers and overlap code create them).
- backward (`Tensor.backward`, `torch.autograd.backward`) runs with the mode still active, so forward code
  re-run by activation recompute inside backward is rewritten too.
- `Tensor.type()` without arguments reports `torch.cuda.*Tensor` names: the distributed optimizer and
  clip_grads check parameter types by those strings.
- Distributed optimizer over torch Adam: resuming from a dist checkpoint needs Adam states to exist
  before loading, and `step` tensors untied after it (see `_patch_torch_adam_resume`).
- `WrappedTorchNorm` (the local spec's norm without Apex) refuses sequence parallel; the patched one
  builds the same torch norm and tags its parameters `sequence_parallel=True`, so
  `finalize_model_grads` all-reduces their grads over the TP group as Megatron does for fused norms.

`init_distributed()` starts a gloo process group (single process or from torchrun's env) and
Megatron's `parallel_state`, seeding the RNG tracker; `destroy_distributed()` undoes it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_PATCHED = False


def cpu_only() -> bool:
    """True when this torch has no usable CUDA device (the patches are needed)."""
    return not torch.cuda.is_available()


def _to_cpu_device(device: Any) -> Any:
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor",
    "torch.HalfTensor",
    "torch.BFloat16Tensor",
    "torch.DoubleTensor",
    "torch.IntTensor",
    "torch.LongTensor",
    "torch.ByteTensor",
    "torch.BoolTensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and reports CUDA tensor type names (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if name in _CUDA_TYPE_NAMES else name
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        if func is torch.Tensor.backward:
            return self._backward(
                *_bind(("tensors", "grad_tensors", "retain_graph", "create_graph", "inputs"), args, kwargs)
            )
        if func is torch.autograd.backward:
            return self._backward(
                *_bind(
                    ("tensors", "grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs"),
                    args,
                    kwargs,
                    drop="grad_variables",
                )
            )
        return func(*args, **kwargs)

    def _backward(self, tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None) -> None:
        """Run backward with this mode active: torch pops a mode while its handler runs, and activation
        recompute executes forward code (causal-mask literals included) inside backward. Same engine call
        as Megatron's own `custom_backward`."""
        create_graph = bool(create_graph)
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        if grad_tensors is None or isinstance(grad_tensors, torch.Tensor):
            grad_tensors = (grad_tensors,) * len(tensors) if grad_tensors is None else (grad_tensors,)
        grads = []
        for t, g in zip(tensors, grad_tensors, strict=True):
            if g is None:
                if t.numel() != 1:
                    raise RuntimeError("grad can be implicitly created only for scalar outputs")
                g = torch.ones_like(t)
            grads.append(g)
        inputs = () if inputs is None else (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        with self:
            torch.autograd.Variable._execution_engine.run_backward(
                tensors,
                tuple(grads),
                create_graph if retain_graph is None else retain_graph,
                create_graph,
                inputs,
                allow_unreachable=True,
                accumulate_grad=True,
            )


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict, drop: str | None = None) -> tuple:
    """Positional + keyword arguments of a backward call, in `names` order (`drop` removed)."""
    bound = dict(zip(names, args, strict=False)) | kwargs
    if "gradient" in bound:  # Tensor.backward's name for grad_tensors
        bound["grad_tensors"] = bound.pop("gradient")
    bound.pop(drop, None)
    return tuple(bound.get(n) for n in names if n != drop)


class _InertStream:
    """Stand-in for torch.cuda.Stream/Event on CPU: every operation is synchronous already."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _InertStream:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name == "elapsed_time":
            return lambda *a, **k: 0.0
        return lambda *a, **k: None


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


def _patch_norm() -> None:
    import dataclasses

    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__

    def new(
        cls,
        config,
        hidden_size,
        eps=1e-5,
        persist_layer_norm=False,
        zero_centered_gamma=False,
        normalization="LayerNorm",
    ):
        sp = config.sequence_parallel
        if sp:
            config = dataclasses.replace(config, sequence_parallel=False)
        norm = original(cls, config, hidden_size, eps, persist_layer_norm, zero_centered_gamma, normalization)
        for p in norm.parameters():
            p.sequence_parallel = sp
        return norm

    torch_norm.WrappedTorchNorm.__new__ = new


def _patch_torch_adam_resume() -> None:
    """Resume the distributed optimizer over torch Adam (what Megatron uses without TE/Apex, i.e. on CPU).

    - `sharded_state_dict(is_loading=True)` reads the step count from the inner Adam state, which torch
      only creates at the first step: a fresh optimizer gets zero states first (the load overwrites them);
    - `load_state_dict` hands every parameter the SAME `step` tensor, which Adam then increments once per
      parameter per step, and the per-parameter copy from the checkpoint leaves it at the primed 0 (wrong
      bias correction after a resume): give each parameter its own tensor holding the saved step;
    - the 'fully_reshardable' load copies every inner state entry from the checkpoint, `step` included, which
      that format keeps in the param groups only: the per-parameter copy skips it (set as above).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    sharded_state_dict, load_state_dict = DistributedOptimizer.sharded_state_dict, DistributedOptimizer.load_state_dict
    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    def adam(opt: DistributedOptimizer) -> torch.optim.Optimizer | None:
        inner = opt.optimizer
        return inner if isinstance(inner, torch.optim.Adam | torch.optim.AdamW) else None

    def patched_sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        inner = adam(self)
        if is_loading and inner is not None:
            for group in inner.param_groups:
                for p in group["params"]:
                    if not inner.state[p]:
                        inner.state[p] = {
                            "step": torch.zeros(()),
                            "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p),
                        }
        return sharded_state_dict(self, model_sharded_state_dict or {}, is_loading, *args, **kwargs)

    def patched_load_state_dict(self, state_dict):
        load_state_dict(self, state_dict)
        inner = adam(self)
        steps = {g.get("step") for g in state_dict["optimizer"]["param_groups"]} - {None}
        if inner is not None and len(steps) == 1:
            step = float(steps.pop())
            for state in inner.state.values():
                state["step"] = torch.tensor(step)

    def patched_set_states(self, model_param, tensors):
        inner = adam(self)
        if inner is not None and "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = inner.param_groups[group_index]["params"][group_order]
            tensors = {**tensors, "step": inner.state[main_param]["step"]}
        set_states(self, model_param, tensors)

    DistributedOptimizer.sharded_state_dict = patched_sharded_state_dict
    DistributedOptimizer._set_main_param_and_optimizer_states = patched_set_states
    DistributedOptimizer.load_state_dict = patched_load_state_dict


def apply_cpu_patches() -> bool:
    """Make Megatron-Core run on this CPU-only torch; returns True if patches are (now) active."""
    global _PATCHED
    if not cpu_only():
        return False
    if _PATCHED:
        return True
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.Stream = torch.cuda.Event = _InertStream
    torch.cuda.current_stream = torch.cuda.default_stream = lambda *a, **k: _InertStream()
    torch.cuda.stream = lambda *a, **k: _InertStream()
    _patch_rng()
    _patch_norm()
    _patch_torch_adam_resume()
    _CudaToCpuMode().__enter__()  # global for this thread: never exited
    _PATCHED = True
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234, **parallel_kwargs: Any) -> None:
    """Start gloo (from torchrun's RANK/WORLD_SIZE env, else a single process) and Megatron's parallel state.

    Re-entrant: with a process group already up it only re-initialises parallel_state (new TP/PP/CP sizes)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    apply_cpu_patches()
    if not dist.is_initialized():
        backend = "gloo" if cpu_only() else "nccl"
        if "WORLD_SIZE" in os.environ:  # torchrun or a test spawning ranks: MASTER_ADDR/PORT come from the env
            dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        else:  # a lone process: a private port, nothing written to the environment (children may start their own)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        if not cpu_only():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp, **parallel_kwargs
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down Megatron's parallel state and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
