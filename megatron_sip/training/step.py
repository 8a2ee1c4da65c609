"""One optimizer step through Megatron's pipeline schedules.

The process groups are the model's own (``GPTModel.pg_collection``, given when it was built) and
are handed to the schedules explicitly."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Optional

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.utils import get_pp_last_rank, is_pp_last_stage
from megatron.core.transformer import TransformerConfig

from megatron_sip.models.checkpointing import unwrap_model
from megatron_sip.training.timers import PhaseTimes


def model_groups(model_chunks: list):
    """The ProcessGroupCollection the model chunks were built with."""
    return unwrap_model(model_chunks[0]).pg_collection


def configure_schedule(config: TransformerConfig, model_chunks: list, optimizer=None) -> None:
    """Hooks Megatron's schedules need: gradient finalisation (DP all-reduce, embedding and
    layer-norm reductions, the per-token loss scaling), loss scaling and DDP's no-sync context."""
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model_chunks[0].no_sync if len(model_chunks) == 1 else None
    if optimizer is not None:
        config.grad_scale_func = optimizer.scale_loss


@dataclasses.dataclass
class StepResult:
    losses: dict[str, float]  # {name: sum / count} over the global batch, on every rank
    grad_norm: float | None
    update_successful: bool


def reduce_losses(loss_reports: list[dict], data_parallel_group) -> dict[str, float]:
    """``{name: [sum, count]}`` reports summed over micro-batches and data-parallel ranks, then
    ``sum / count`` (a count of 0 gives 0)."""
    names = sorted({name for report in loss_reports for name in report})
    totals = torch.zeros(len(names), 2, dtype=torch.float64)
    for report in loss_reports:
        for i, name in enumerate(names):
            if name in report:
                totals[i] += report[name].detach().double().cpu().reshape(2)
    if data_parallel_group.size() > 1:
        torch.distributed.all_reduce(totals, group=data_parallel_group)
    return {name: (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, name in enumerate(names)}


def forward_backward(
    forward_step_func: Callable,
    data_iterator: Iterator,
    model_chunks: list,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> list[dict]:
    """Runs Megatron's schedule (no pipelining, or 1F1B at PP > 1) over the model's process
    groups; loss reports on the last stage, an empty list elsewhere."""
    groups = model_groups(model_chunks)
    extra = {}
    if groups.pp.size() > 1:
        config = unwrap_model(model_chunks[0]).config
        extra["p2p_communicator"] = P2PCommunicator(pp_group=groups.pp, config=config)
    return get_forward_backward_func(pp_size=groups.pp.size())(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        pg_collection=groups,
        **extra,
    )


def train_step(
    forward_step_func: Callable,
    data_iterator: Iterator,
    model_chunks: list,
    optimizer,
    scheduler,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    samples_per_step: int,
    times: Optional[PhaseTimes] = None,
) -> StepResult:
    """Zero grads, forward/backward over the global batch, optimizer and schedule step;
    ``times`` gets the phases ``forward_backward`` and ``optimizer``."""

    def phase(name: str):
        return times.phase(name) if times is not None else contextlib.nullcontext()

    with phase("forward_backward"):
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(
            forward_step_func,
            data_iterator,
            model_chunks,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
        )
        losses = broadcast_from_last_stage(reports, model_chunks)
    with phase("optimizer"):
        if not _has_loss_scaler(optimizer) and not _loss_and_grads_finite(losses, model_chunks):
            # Megatron's skipped iteration: no parameter update and the LR schedule stays put.
            # The norm of a gradient with a NaN or Inf in it is not finite; it is not measured.
            return StepResult(losses, float("nan"), False)
        update_successful, grad_norm, _ = optimizer.step()
        if update_successful:
            scheduler.step(increment=samples_per_step)
    return StepResult(losses, grad_norm, update_successful)


def _has_loss_scaler(optimizer) -> bool:
    """fp16 with a loss scaler: the optimizer finds NaN/Inf gradients itself, skips the step and
    lowers the scale (an overflow is the scaler's signal, not a bad batch)."""
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(getattr(opt, "grad_scaler", None) is not None for opt in optimizers)


def _loss_and_grads_finite(losses: dict[str, float], model_chunks: list) -> bool:
    """False on every rank when the loss or any rank's gradient holds a NaN or Inf."""
    bad = not all(math.isfinite(value) for value in losses.values())
    if not bad:
        for chunk in model_chunks:
            for buffer in chunk.buffers + chunk.expert_parallel_buffers:
                if not torch.isfinite(buffer.grad_data).all():
                    bad = True
                    break
    # Gradients are sharded over TP and PP (and over DP with the distributed optimizer): every
    # rank of the model must agree to skip, or the ranks' weights would diverge.
    groups = model_groups(model_chunks)
    flag = torch.tensor([int(bad)], dtype=torch.int32, device=_collective_device())
    for group in (groups.tp, groups.pp, groups.dp):
        if group.size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    return not flag.item()


def _collective_device() -> str:
    return "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"


def broadcast_from_last_stage(reports: list[dict], model_chunks: list) -> dict[str, float]:
    """Loss reports exist only on the last pipeline stage: reduce them there, give every rank
    the values."""
    groups = model_groups(model_chunks)
    last = is_pp_last_stage(groups.pp)
    payload = [reduce_losses(reports, groups.dp) if last else None]
    if groups.pp.size() > 1:
        torch.distributed.broadcast_object_list(
            payload, src=get_pp_last_rank(groups.pp), group=groups.pp
        )
    return payload[0]
