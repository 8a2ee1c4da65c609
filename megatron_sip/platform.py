"""The one place where megatron-sip adapts Megatron-Core to the machine it runs on.

Megatron-Core is written for CUDA: it asks for ``torch.cuda.current_device()``, passes
``device="cuda"`` and ``pin_memory=True``, calls ``.cuda()``, dispatches on type strings such as
``'torch.cuda.FloatTensor'``, keeps CUDA RNG states, asserts CUDA gradients when clipping, and
without apex/Transformer Engine mishandles torch AdamW's per-parameter ``step`` in the distributed
optimizer. In CPU mode this module makes all of that work on the CPU, so every other module is
written as for GPUs and never branches on the device. GPU mode changes nothing.

Call :func:`activate` once at start-up, before any model is built (``initialize.py`` does).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Literal

import torch
from torch.overrides import TorchFunctionMode

from megatron_sip.errors import ConfigError, require_choice

logger = logging.getLogger(__name__)

DeviceKind = Literal["auto", "cuda", "cpu"]


@dataclasses.dataclass
class PlatformConfig:
    """Where the job runs."""

    device: DeviceKind = "auto"
    """Device to run on: `cuda`, `cpu` (gloo, Megatron-Core adapted to the CPU), or `auto` (cuda
    when a GPU is visible, else cpu)."""

    def __post_init__(self):
        require_choice("--device", self.device, ("auto", "cuda", "cpu"))


def resolve_device(device: str) -> str:
    """Turns `auto` into `cuda` or `cpu`; checks that `cuda` is available when asked for."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device", "cuda was requested but no GPU is visible; use --device cpu or auto"
        )
    return device


_active: str | None = None
_undo: list = []


def active_device() -> str:
    """The device kind activated by :func:`activate` (`cuda` or `cpu`)."""
    if _active is None:
        raise RuntimeError("megatron_sip.platform.activate() has not been called")
    return _active


def is_cpu() -> bool:
    return _active == "cpu"


def torch_device() -> torch.device:
    """The torch device tensors of this process live on."""
    if active_device() == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def distributed_backend() -> str:
    return "gloo" if active_device() == "cpu" else "nccl"


def model_config_overrides() -> dict:
    """TransformerConfig settings the device needs: CPU initialisation and no CUDA fusions."""
    if active_device() == "cpu":
        return {
            "use_cpu_initialization": True,
            "gradient_accumulation_fusion": False,
            "bias_activation_fusion": False,
            "bias_dropout_fusion": False,
            "masked_softmax_fusion": False,
            "apply_rope_fusion": False,
            "persist_layer_norm": False,
        }
    return {}


def activate(device: str = "auto") -> str:
    """Selects the device for this process; in CPU mode installs the adaptations. Idempotent."""
    global _active
    device = resolve_device(device)
    if _active is not None:
        if _active != device:
            raise RuntimeError(f"platform already active as {_active}, cannot switch to {device}")
        return device
    if device == "cpu":
        _install_cpu_adaptations()
    _active = device
    return device


def deactivate() -> None:
    """Undoes :func:`activate` (for tests that run several set-ups in one process)."""
    global _active
    while _undo:
        _undo.pop()()
    _active = None


# --------------------------------------------------------------------------------------------
# CPU adaptations
# --------------------------------------------------------------------------------------------


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare int is a CUDA ordinal (what torch.cuda.current_device() returns).
    return isinstance(device, int) and not isinstance(device, bool)


_CPU = torch.device("cpu")


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU and drops ``pin_memory`` (~200 call sites)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        elif func is torch.Tensor.pin_memory:
            return args[0]
        elif func is torch.Tensor.type:
            # Megatron's optimizers dispatch on type strings such as 'torch.cuda.FloatTensor':
            # CPU tensors stand in for CUDA ones, so they answer (and convert) with CUDA names.
            if len(args) == 1 and not kwargs:
                return func(*args).replace("torch.", "torch.cuda.", 1)
            if len(args) > 1 and isinstance(args[1], str):
                args = (args[0], args[1].replace("torch.cuda.", "torch.", 1), *args[2:])
        return func(*args, **kwargs)


def _patch(owner, name, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    _undo.append(lambda: setattr(owner, name, original))


def _cpu_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(state, *args, **kwargs):
    torch.set_rng_state(state)


def _seed_cpu_generator(seed):
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which lands back here.
    torch.default_generator.manual_seed(int(seed))


def _drop_cpu_rng_warning(record: logging.LogRecord) -> bool:
    return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _install_cpu_adaptations() -> None:
    import megatron.core.optimizer.optimizer as megatron_optimizer
    import megatron.core.tensor_parallel.random as megatron_random
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    mode = _CudaToCpuMode()
    mode.__enter__()
    _undo.append(lambda: mode.__exit__(None, None, None))

    # 1. Device requests that do not pass through a torch function.
    _patch(torch.cuda, "current_device", lambda: _CPU)
    _patch(torch.cuda, "synchronize", lambda *a, **k: None)
    _patch(torch.cuda, "device_count", lambda: 0)
    _patch(torch.Tensor, "cuda", lambda self, *a, **k: self)

    # 2. RNG: CUDA generator calls go to the CPU generator, so Megatron's RNG tracker and
    #    model_parallel_cuda_manual_seed work unchanged.
    for owner in (torch.cuda, torch.cuda.random):
        _patch(owner, "get_rng_state", _cpu_rng_state)
        _patch(owner, "set_rng_state", _set_cpu_rng_state)
        _patch(owner, "manual_seed", _seed_cpu_generator)
        _patch(owner, "manual_seed_all", _seed_cpu_generator)
    _patch(megatron_random, "_get_cuda_rng_state", _cpu_rng_state)
    _patch(megatron_random, "_set_cuda_rng_state", _set_cpu_rng_state)
    # The tracker warns when the CPU generator moves inside a CUDA-RNG fork; here it always does.
    random_logger = logging.getLogger(megatron_random.__name__)
    random_logger.addFilter(_drop_cpu_rng_warning)
    _undo.append(lambda: random_logger.removeFilter(_drop_cpu_rng_warning))

    # 3. Gradient clipping: Megatron's version asserts CUDA gradients.
    _patch(megatron_optimizer, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_cpu)

    # 4. Without apex/TE Megatron's optimizer wraps torch's AdamW, whose per-parameter "step"
    #    the distributed optimizer does not handle on its own (see the functions below).
    for name, replacement in (
        ("state_dict", _distopt_state_dict),
        ("load_state_dict", _distopt_load_state_dict),
        ("_set_main_param_and_optimizer_states", _distopt_set_states),
    ):
        _originals[name] = getattr(DistributedOptimizer, name)
        _patch(DistributedOptimizer, name, replacement)


_originals: dict = {}


def _distopt_state_dict(self):
    """A fresh torch AdamW has no state until its first step, but the distributed optimizer reads
    "step" from every state when it builds a checkpoint: create what a first step would find
    (step 0, zero moments; parameters untouched)."""
    inner = self.optimizer
    if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and not inner.state:
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(param),
                    "exp_avg_sq": torch.zeros_like(param),
                }
    return _originals["state_dict"](self)


def _distopt_load_state_dict(self, state_dict):
    """Loading gives every parameter's state the same "step" tensor, which torch's AdamW then
    increments once per parameter each step: give each its own copy."""
    _originals["load_state_dict"](self, state_dict)
    if isinstance(self.optimizer, torch.optim.Optimizer):
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _distopt_set_states(self, model_param, tensors):
    """The resharded tensors carry no "step" (restored from the param groups), yet every key of
    the parameter's state is copied from them: hand it the value it already holds."""
    if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state[main_param].get("step")
        if step is not None:
            tensors = {**tensors, "step": step}
    return _originals["_set_main_param_and_optimizer_states"](self, model_param, tensors)


def clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's ``clip_grad_by_total_norm_fp32`` for CPU tensors: scale grads in place."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if not math.isfinite(clip_coeff) or clip_coeff >= 1.0:
        return
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            grad.detach().mul_(clip_coeff)
