"""Batched DPO log-ratios from vocabulary-parallel logits, without a float32 copy of the logits.

Per token, the target's log-probability is ``z[y] - logsumexp(z)``. The op computes it from this
rank's vocabulary shard ``[vocab_start, vocab_start + V_local)`` of the logits ``[..., V_local]``
(fp32 or bf16): each kernel returns per-row statistics (max, sum of exp(z - max), the target's
logit or 0 when another shard holds it); at tensor-parallel size > 1 two all-reduces over the TP
group combine them (the max, then the rescaled sums and target logits together). The backward
writes ``dL/dz = g * (onehot(y) - exp((z - max) - log sum))`` straight into a gradient of the
logits' dtype from the saved logits and the per-row max and log-sum, so neither log_softmax nor
softmax is ever stored.

Precision: the max and the log-sum are kept apart, never added into one ``lse``. ``lse`` has the
magnitude of the logits, so in fp32 it is rounded at ``ulp(max)`` (~8e-6 for logits near 100) and
``exp(z - lse)`` carries that error into every gradient element; ``z - max`` is exact near the
max and ``log sum`` lies in ``[0, log V]``, so ``exp((z - max) - log sum)`` is as accurate as
torch's own fp32 ``log_softmax`` backward (tests/test_dpo_op.py checks it against float64 at
logit scales 1, 30 and 100).

Three implementations share the API, picked by device (``implementation="auto"``):
``torch`` (the clear reference, materialises fp32 copies), ``cpu`` (``megatron_sip._dpo_cpu``,
csrc/dpo_logratio_cpu.cpp) and ``cuda`` (``megatron_sip._dpo_cuda``, csrc/dpo_logratio_cuda.cu).
A kernel that was not built falls back to ``torch`` (logged once).

On top: masked per-sequence sums, and the DPO log-ratios, margins and loss of (chosen, rejected)
index pairs from the policy's and the reference's sequence log-probs.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "torch", "cpu", "cuda")
_MODULES = {"cpu": "megatron_sip._dpo_cpu", "cuda": "megatron_sip._dpo_cuda"}
_loaded: dict[str, object] = {}
_warned: set[str] = set()


def kernel_module(name: str):
    """The compiled extension for ``cpu`` / ``cuda``, or None when it was not built."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except ImportError:
            _loaded[name] = None
    return _loaded[name]


def available_implementations() -> list[str]:
    return ["torch"] + [name for name in ("cpu", "cuda") if kernel_module(name) is not None]


class _TorchKernels:
    """The reference: straightforward fp32 torch (materialises fp32 copies of the logits)."""

    @staticmethod
    def stats(logits, targets, vocab_start, out):
        values = logits.to(out.dtype)
        maximum = values.max(dim=-1).values
        out[:, 0] = maximum
        out[:, 1] = torch.exp(values - maximum[:, None]).sum(-1)
        local = targets - vocab_start
        inside = (local >= 0) & (local < logits.shape[-1])
        picked = values.gather(1, local.clamp(0, logits.shape[-1] - 1)[:, None])[:, 0]
        out[:, 2] = torch.where(inside, picked, torch.zeros_like(picked))

    @staticmethod
    def backward(logits, targets, vocab_start, maximum, log_sum, grad, out):
        values = -torch.exp((logits.to(maximum.dtype) - maximum[:, None]) - log_sum[:, None])
        local = targets - vocab_start
        inside = (local >= 0) & (local < logits.shape[-1])
        rows = torch.arange(logits.shape[0], device=logits.device)[inside]
        values[rows, local[inside]] += 1.0
        out.copy_(values * grad[:, None])


def _kernels(implementation: str, device: torch.device):
    if implementation == "auto":
        implementation = "cuda" if device.type == "cuda" else "cpu"
    if implementation == "torch":
        return _TorchKernels
    if (implementation == "cuda") != (device.type == "cuda"):
        raise ValueError(f"implementation {implementation!r} does not run on {device}")
    module = kernel_module(implementation)
    if module is None:
        if implementation not in _warned:
            _warned.add(implementation)
            logger.warning(
                "%s is not built (pip install --no-build-isolation -e .): using the torch "
                "reference of the DPO log-ratio op",
                _MODULES[implementation],
            )
        return _TorchKernels
    return module


def _combine(stats: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, log sum of exp(z - max), target logit) per row from the shards' statistics: two
    collectives at TP > 1. The caller keeps max and log-sum apart (see the module's note on
    precision)."""
    maximum, sums, target = stats[:, 0], stats[:, 1], stats[:, 2]
    if group is not None and torch.distributed.get_world_size(group) > 1:
        global_max = maximum.clone()
        torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=group)
        both = torch.stack([sums * torch.exp(maximum - global_max), target])
        torch.distributed.all_reduce(both, group=group)
        maximum, (sums, target) = global_max, both
    # Columns of the [N, 3] statistics are strided views: the kernels take contiguous rows.
    return maximum.contiguous(), torch.log(sums), target


class _TargetLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group, implementation):
        shape = targets.shape
        flat = logits.reshape(-1, logits.shape[-1])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        flat_targets = targets.reshape(-1).long().contiguous()
        kernels = _kernels(implementation, logits.device)
        # float64 logits (gradcheck) keep float64 statistics; fp32 and bf16 accumulate in fp32.
        dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
        if dtype == torch.float64:
            kernels = _TorchKernels
        stats = torch.empty(flat.shape[0], 3, dtype=dtype, device=logits.device)
        kernels.stats(flat, flat_targets, int(vocab_start), stats)
        maximum, log_sum, target = _combine(stats, group)
        ctx.save_for_backward(flat, flat_targets, maximum, log_sum)
        ctx.vocab_start, ctx.kernels, ctx.logits_shape = int(vocab_start), kernels, logits.shape
        return ((target - maximum) - log_sum).view(shape)

    @staticmethod
    def backward(ctx, grad_output):
        flat, targets, maximum, log_sum = ctx.saved_tensors
        grad = grad_output.reshape(-1).to(maximum.dtype).contiguous()
        grad_logits = torch.empty_like(flat)
        ctx.kernels.backward(flat, targets, ctx.vocab_start, maximum, log_sum, grad, grad_logits)
        return grad_logits.view(ctx.logits_shape), None, None, None, None


def target_log_probs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int = 0,
    group=None,
    implementation: str = "auto",
) -> torch.Tensor:
    """log p(targets) per token, fp32, shape of ``targets``. ``logits [..., V_local]`` is this
    rank's vocabulary shard starting at ``vocab_start``; ``group`` the tensor-parallel group
    (None: the full vocabulary is local). Differentiable in ``logits``; without grad (e.g. the
    reference) nothing is saved."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}"
        )
    return _TargetLogProbs.apply(logits, targets, vocab_start, group, implementation)


def sequence_log_probs(token_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked sums over the last (token) dimension."""
    return (token_log_probs * mask).sum(-1)


@dataclasses.dataclass
class DPOOutput:
    loss: torch.Tensor  # [P] -log sigmoid(beta * margin)
    margins: torch.Tensor  # [P] (lp+ - ref+) - (lp- - ref-)
    chosen_log_ratios: torch.Tensor  # [P] lp+ - ref+
    rejected_log_ratios: torch.Tensor  # [P] lp- - ref-


def dpo_log_ratios(
    policy: torch.Tensor,
    reference: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    beta: float,
    reference_requires_grad: Optional[bool] = False,
) -> DPOOutput:
    """DPO terms of P (chosen, rejected) pairs, given as indices into the sequences of
    ``policy`` / ``reference`` (sequence log-probs, [S]). The reference side carries no grad."""
    if not reference_requires_grad:
        reference = reference.detach()
    chosen_ratios = policy[chosen] - reference[chosen]
    rejected_ratios = policy[rejected] - reference[rejected]
    margins = chosen_ratios - rejected_ratios
    return DPOOutput(-F.logsigmoid(beta * margins), margins, chosen_ratios, rejected_ratios)
