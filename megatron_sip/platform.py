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

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
from collections.abc import Mapping
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


FUSIONS = (
    "gradient_accumulation_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "apply_rope_fusion",
    "persist_layer_norm",
)
"""TransformerConfig's kernel-fusion switches (Megatron-LM turns them on unless ``--no-...``)."""


def model_config_overrides(fusions: Mapping[str, bool] | None = None) -> dict:
    """TransformerConfig settings for the device. ``fusions``: the requested value of each of
    :data:`FUSIONS` and of ``flash_decode`` (default: all off). On the CPU: CPU initialisation,
    every fusion off (they are CUDA kernels; the unfused paths compute the same thing) and flash
    decode on. On a GPU: as requested, after checking that the kernels they need are installed
    (Megatron-Core would otherwise fail deep inside model construction or decoding)."""
    fusions = {name: False for name in FUSIONS} | {"flash_decode": False} | dict(fusions or {})
    if active_device() == "cpu":
        # Flash decode is on: the CPU has torch versions of its kernels (see
        # _install_cpu_adaptations) and no faster way to decode.
        return {
            "use_cpu_initialization": True,
            **{name: False for name in FUSIONS},
            "flash_decode": True,
        }
    if fusions.get("flash_decode"):
        from megatron.core.transformer import attention

        if attention.flash_attn_with_kvcache is None:
            raise ConfigError(
                "--flash-decode", "flash decoding needs flash-attn's flash_attn_with_kvcache"
            )
    if fusions["gradient_accumulation_fusion"]:
        from megatron.core.tensor_parallel import layers

        # Megatron-Core's own linear layers (the output layer even with Transformer Engine's
        # spec) take the fused weight-gradient kernel from apex.
        if not layers._grad_accum_fusion_available:
            raise ConfigError(
                "--no-gradient-accumulation-fusion",
                "gradient accumulation fusion (on by default, as in Megatron-LM) needs apex's "
                "fused_weight_gradient_mlp_cuda extension; install apex or pass "
                "--no-gradient-accumulation-fusion",
            )
    if fusions["apply_rope_fusion"]:
        from megatron.core.models.common.embeddings import rope_utils

        if rope_utils.fused_apply_rotary_pos_emb is None:
            raise ConfigError(
                "--no-rope-fusion",
                "RoPE fusion (on by default, as in Megatron-LM) needs Transformer Engine >= 1.4; "
                "install it or pass --no-rope-fusion",
            )
    return fusions


class LocalNorm(torch.nn.Module):
    """LayerNorm or RMSNorm (``config.normalization``) for Megatron-Core's local layer spec,
    standing in for ``WrappedTorchNorm`` (torch's norms; it asserts sequence parallelism and
    zero-centred gamma off) where apex's fused norms are absent: always on the CPU.

    As Megatron-Core's fused norms do: under sequence parallelism each rank normalises its own
    slice of the sequence, so the weights are marked ``sequence_parallel`` and
    ``finalize_model_grads`` all-reduces their gradients over the tensor-parallel group; with
    ``layernorm_zero_centered_gamma`` (``--apply-layernorm-1p``) the weight stores gamma - 1,
    is initialised to zero and applied as 1 + weight. ``persist_layer_norm`` selects an apex
    kernel and has no meaning here (apex's norm falls back the same way for unsupported sizes).
    Parameter names match torch's norms, so checkpoints are unchanged."""

    def __init__(
        self,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        super().__init__()
        del persist_layer_norm, zero_centered_gamma, normalization  # read from config, as apex's
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"LocalNorm takes LayerNorm or RMSNorm, not {config.normalization}")
        self.config = config
        self.rms = config.normalization == "RMSNorm"
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        self.shape = (hidden_size,)
        self.eps = eps
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        factory = {"device": device, "dtype": config.params_dtype}
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, **factory))
        self.bias = None if self.rms else torch.nn.Parameter(torch.empty(hidden_size, **factory))
        self.reset_parameters()
        for param in self.parameters():
            # What Megatron-Core's fused norms set: finalize_model_grads reads it.
            param.sequence_parallel = config.sequence_parallel

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(0.0 if self.zero_centered_gamma else 1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        if self.rms:
            return torch.nn.functional.rms_norm(hidden, self.shape, weight, self.eps)
        return torch.nn.functional.layer_norm(hidden, self.shape, weight, self.bias, self.eps)


def local_block_spec(layer_spec, config, num_layers: int):
    """Megatron-Core's local-spec transformer block (``layer_spec`` repeated ``num_layers``
    times, then the final norm) with every ``WrappedTorchNorm`` replaced by :class:`LocalNorm`,
    so sequence parallelism and ``--apply-layernorm-1p`` work without apex (GPTModel otherwise
    builds its final norm from the same torch wrapper)."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (
        LayerNormImpl,
        TransformerBlockSubmodules,
    )

    def substitute(spec):
        if spec is WrappedTorchNorm:
            return LocalNorm
        if isinstance(spec, ModuleSpec) and spec.submodules is not None:
            fields = dataclasses.fields(spec.submodules)
            changes = {f.name: substitute(getattr(spec.submodules, f.name)) for f in fields}
            submodules = dataclasses.replace(spec.submodules, **changes)
            return dataclasses.replace(spec, submodules=submodules)
        return spec

    return TransformerBlockSubmodules(
        layer_specs=[substitute(layer_spec)] * num_layers,
        layer_norm=substitute(LayerNormImpl),
    )


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

    # 3b. Activation recomputation re-runs forward code inside the autograd engine, which runs
    #     backward functions and hooks without the thread's torch function modes: run Megatron's
    #     recompute entry points under the device rewriting too.
    #     (Megatron's output-discarding CheckpointWithoutOutput needs Transformer Engine.)
    from megatron.core.tensor_parallel.random import CheckpointFunction

    _patch_in_mode(CheckpointFunction, "backward")

    # 4. Without apex/TE Megatron's optimizer wraps torch's AdamW, whose per-parameter "step"
    #    the distributed optimizer does not handle on its own (see the functions below).
    for name, replacement in (
        ("state_dict", _distopt_state_dict),
        ("load_state_dict", _distopt_load_state_dict),
        ("_set_main_param_and_optimizer_states", _distopt_set_states),
    ):
        _originals[name] = getattr(DistributedOptimizer, name)
        _patch(DistributedOptimizer, name, replacement)

    # 5. Static-batch decoding. Without flash decode, Megatron-Core caches un-rotated keys and
    #    re-applies RoPE to the whole key cache in every layer at every new token; with it (its
    #    GPU path) each new key is rotated once before it is cached. That path calls two
    #    flash-attn kernels (CUDA-only; the unfused RoPE fallback Megatron-Core has for one of
    #    them takes cos/sin values for angles): the CPU gets torch versions of both.
    import megatron.core.transformer.attention as megatron_attention
    from megatron.core.models.common.embeddings import rope_utils

    _patch(megatron_attention, "flash_attn_with_kvcache", kv_cache_attention)
    _patch(rope_utils, "apply_rotary_emb_flash", apply_rotary_emb)


_originals: dict = {}


def _patch_in_mode(owner, name) -> None:
    """Makes ``owner.name`` (a function or staticmethod) run under :class:`_CudaToCpuMode`."""
    attribute = owner.__dict__[name]
    function = attribute.__func__ if isinstance(attribute, staticmethod) else attribute

    @functools.wraps(function)
    def in_mode(*args, **kwargs):
        with _CudaToCpuMode():
            return function(*args, **kwargs)

    setattr(owner, name, staticmethod(in_mode) if isinstance(attribute, staticmethod) else in_mode)
    _undo.append(lambda: setattr(owner, name, attribute))


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
    """Every key of the parameter's state is copied from ``tensors``, but "step" is restored from
    the param groups before this runs: the fully reshardable tensors carry no "step", and the
    dp_reshardable ones carry the value from before the load. Hand it the restored value."""
    if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
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


# ---- flash-attn's decoding kernels, in torch --------------------------------------------------


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, **unused):
    """flash-attn's ``apply_rotary_emb``: ``x`` [batch, seq, heads, dim] rotated at positions
    ``seqlen_offsets`` + 0..seq-1 by ``cos``/``sin`` [positions, rotary_dim / 2] (the first
    rotary_dim channels; GPT-NeoX halves, or interleaved pairs)."""
    if unused or not isinstance(seqlen_offsets, int):
        raise NotImplementedError(f"apply_rotary_emb on the CPU: {sorted(unused)} not supported")
    seq = x.shape[1]
    cos = cos[seqlen_offsets : seqlen_offsets + seq, None, :].to(x.dtype)
    sin = sin[seqlen_offsets : seqlen_offsets + seq, None, :].to(x.dtype)
    rotary = 2 * cos.shape[-1]
    rot, rest = x[..., :rotary], x[..., rotary:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = torch.cat((out, rest), dim=-1) if rest.shape[-1] else out
    if inplace:
        x.copy_(out)
        return x
    return out


def kv_cache_attention(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    softmax_scale=None,
    causal=False,
    rotary_interleaved=True,
    **unused,
):
    """flash-attn's ``flash_attn_with_kvcache`` for one cache offset shared by every row (static
    batching): rotates ``q`` and the new ``k`` at that offset, writes ``k``/``v`` into the caches
    ([batch, positions, kv heads, dim], views of Megatron-Core's [positions, batch, ...] memory)
    and attends over the cache up to the new tokens. Grouped-query heads share their key/value
    head without copies; the cache is read in place (strided batched matmuls)."""
    if any(value is not None for value in unused.values()):
        raise NotImplementedError(f"flash_attn_with_kvcache on the CPU: {sorted(unused)}")
    offsets = torch.as_tensor(cache_seqlens if cache_seqlens is not None else 0).reshape(-1)
    offset = int(offsets[0])
    if bool((offsets != offset).any()):
        raise NotImplementedError("flash_attn_with_kvcache on the CPU: one offset for all rows")
    batch, seq, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    if rotary_cos is not None:
        q = apply_rotary_emb(q, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=offset)
        if k is not None:
            k = apply_rotary_emb(
                k, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=offset
            )
    length = offset
    if k is not None:
        length += k.shape[1]
        k_cache[:, offset:length] = k
        v_cache[:, offset:length] = v
    group = heads // kv_heads
    scale = softmax_scale if softmax_scale is not None else dim**-0.5
    # [batch * kv heads, group * seq, dim]: a query group attends to its key/value head.
    query = q.reshape(batch, seq, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
    query = query.reshape(batch * kv_heads, group * seq, dim)
    layout = _shared_prefix.get()
    shared = 0
    if layout is not None and layout.prefixes * layout.samples == batch:
        shared = min(layout.length, length - seq)  # positions every sample of a prefix shares
    keys = k_cache[:, shared:length].permute(0, 2, 1, 3).flatten(0, 1)
    values = v_cache[:, shared:length].permute(0, 2, 1, 3).flatten(0, 1)
    scores = torch.bmm(query, keys.transpose(1, 2))
    if shared:
        scores = torch.cat([_prefix_scores(q, k_cache, layout, shared, group), scores], dim=-1)
    scores = scores * scale
    if causal and seq > 1:
        # Query i sits at position length - seq + i and sees keys up to it.
        rows = torch.arange(length - seq, length).repeat(group)
        scores.masked_fill_(torch.arange(length)[None, :] > rows[:, None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.bmm(probs[..., shared:], values)
    if shared:
        out = out + _prefix_values(probs[..., :shared], v_cache, layout, shared, group)
    out = out.reshape(batch, kv_heads, group, seq, dim)
    return out.permute(0, 3, 1, 2, 4).reshape(batch, seq, heads, dim)


@dataclasses.dataclass(frozen=True)
class SharedPrefix:
    """Rows ``[i * samples, (i + 1) * samples)`` of the decode batch continue prefix ``i`` and
    hold the same keys and values at positions below ``length``."""

    prefixes: int
    samples: int
    length: int


_shared_prefix: contextvars.ContextVar = contextvars.ContextVar("shared_prefix", default=None)


@contextlib.contextmanager
def shared_prefix_decoding(prefixes: int, samples: int, length: int):
    """Declares the decode batch's shared prefixes (see :class:`SharedPrefix`) to the CPU
    attention kernel, which then reads each prefix's keys and values once for all its samples
    (one matrix product per prefix instead of one matrix-vector product per sample: the prefix
    dominates what decoding reads). GPU kernels read every row's own copy."""
    token = _shared_prefix.set(SharedPrefix(prefixes, samples, length))
    try:
        yield
    finally:
        _shared_prefix.reset(token)


def _prefix_scores(q, k_cache, layout: SharedPrefix, shared: int, group: int):
    """Scores of every row's queries against its prefix's shared keys, [batch * kv heads,
    group * seq, shared], read in place from the first sample's row of each prefix."""
    batch, seq, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    samples = layout.samples
    # Per prefix: [kv heads, samples * group * seq, dim] against [kv heads, dim, shared].
    query = q.reshape(layout.prefixes, samples, seq, kv_heads, group, dim)
    query = query.permute(0, 3, 1, 4, 2, 5).reshape(layout.prefixes, kv_heads, -1, dim)
    scores = torch.stack(
        [
            torch.bmm(query[i], k_cache[i * samples, :shared].permute(1, 2, 0))
            for i in range(layout.prefixes)
        ]
    ).view(layout.prefixes, kv_heads, samples, group * seq, shared)
    return scores.transpose(1, 2).reshape(batch * kv_heads, group * seq, shared)


def _prefix_values(probs, v_cache, layout: SharedPrefix, shared: int, group: int):
    """The shared prefix's part of the attention output, [batch * kv heads, group * seq, dim]."""
    kv_heads = v_cache.shape[2]
    samples = layout.samples
    rows = probs.shape[1]  # group * seq
    weights = probs.reshape(layout.prefixes, samples, kv_heads, rows, shared).transpose(1, 2)
    weights = weights.reshape(layout.prefixes, kv_heads, samples * rows, shared)
    out = torch.stack(
        [
            torch.bmm(weights[i], v_cache[i * samples, :shared].transpose(0, 1))
            for i in range(layout.prefixes)
        ]
    ).view(layout.prefixes, kv_heads, samples, rows, -1)
    return out.transpose(1, 2).reshape(layout.prefixes * samples * kv_heads, rows, -1)
