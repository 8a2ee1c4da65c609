"""One optimizer step through Megatron's pipeline schedules."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig


def configure_schedule(config: TransformerConfig, model_chunks: list, optimizer=None) -> None:
    """Hooks Megatron's schedules need: gradient finalisation (DP all-reduce, embedding and
    layer-norm reductions), loss scaling and DDP's no-sync context."""
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model_chunks[0].no_sync if len(model_chunks) == 1 else None
    if optimizer is not None:
        config.grad_scale_func = optimizer.scale_loss


@dataclasses.dataclass
class StepResult:
    losses: dict[str, float]  # mean over the global batch, on every rank
    grad_norm: float | None
    update_successful: bool


def reduce_losses(loss_reports: list[dict]) -> dict[str, float]:
    """Averages ``{name: [sum, count]}`` reports over micro-batches and data-parallel ranks, and
    broadcasts the result from the last pipeline stage so every rank can log it."""
    names = sorted({name for report in loss_reports for name in report})
    totals = torch.zeros(len(names), 2)
    for report in loss_reports:
        for i, name in enumerate(names):
            if name in report:
                totals[i] += report[name].detach().float().cpu().reshape(2)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
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
    """Runs Megatron's schedule (no pipelining, or 1F1B at PP > 1); loss reports on last stage."""
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
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
) -> StepResult:
    """Zero grads, forward/backward over the global batch, optimizer and schedule step."""
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
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=samples_per_step)
    losses = broadcast_from_last_stage(reports)
    return StepResult(losses, grad_norm, update_successful)


def broadcast_from_last_stage(reports: list[dict]) -> dict[str, float]:
    """Loss reports exist only on the last pipeline stage; give every rank the reduced values."""
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    payload = [reduce_losses(reports) if parallel_state.is_pipeline_last_stage() else None]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast_object_list(payload, src=last, group=pp_group)
    return payload[0]
