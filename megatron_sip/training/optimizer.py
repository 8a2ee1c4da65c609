"""Megatron's optimizer and learning-rate schedule from a TrainingConfig."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_sip.training.config import TrainingConfig


def build_optimizer(
    training: TrainingConfig, model_chunks: list, data_parallel_size: int
) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """The Megatron optimizer over DDP-wrapped chunks and its sample-based LR/WD schedule."""
    for chunk in model_chunks:
        if chunk.ddp_config.use_distributed_optimizer != training.use_distributed_optimizer:
            raise ValueError(
                "the model's DDP wrapper and the optimizer disagree on --use-distributed-optimizer:"
                " build the model with build_model(..., use_distributed_optimizer="
                f"{training.use_distributed_optimizer})"
            )
    config = OptimizerConfig(
        optimizer=training.optimizer,
        lr=training.lr,
        min_lr=training.min_lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_eps=training.adam_eps,
        clip_grad=training.clip_grad,
        bf16=training.bf16,
        params_dtype=torch.bfloat16 if training.bf16 else torch.float32,
        use_distributed_optimizer=training.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    # As Megatron-LM: schedule steps count samples, so the schedule survives batch-size changes.
    samples_per_step = training.global_batch(data_parallel_size)
    decay_iters = training.lr_decay_iters or training.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_warmup_steps=training.lr_warmup_iters * samples_per_step,
        lr_decay_steps=max(decay_iters, training.lr_warmup_iters + 1) * samples_per_step,
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=max(training.train_iters, 1) * samples_per_step,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


@torch.no_grad()
def fp32_main_params(optimizer, params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The fp32 value the optimizer holds for each model parameter, in order.

    In bf16 training the model's parameters are bf16 copies of the optimizer's fp32 main
    parameters; anything that accumulates small increments of the weights (the EMA reference)
    must read the fp32 values. Megatron's float16 optimizer keeps one fp32 copy per parameter;
    the distributed optimizer keeps only this data-parallel rank's shard of it, so the full
    values are assembled with one all-reduce over the data-parallel group (collective: every
    data-parallel rank calls this together). Parameters the optimizer keeps in fp32 anyway
    (fp32 training) are returned as they are.
    """
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    main: dict[torch.nn.Parameter, torch.Tensor] = {}
    for part in inner:
        if hasattr(part, "shard_fp32_from_float16_groups"):
            main.update(_gather_distributed_main_params(part, params))
        elif hasattr(part, "fp32_from_float16_groups"):
            for model_group, main_group in zip(part.float16_groups, part.fp32_from_float16_groups):
                main.update(zip(model_group, main_group))
    return [main.get(param, param.detach().float()) for param in params]


def _gather_distributed_main_params(optimizer, params) -> dict:
    """Full fp32 values of the bf16 parameters whose shards the distributed optimizer holds."""
    shards = {}
    for model_group, shard_group in zip(
        optimizer.model_float16_groups, optimizer.shard_fp32_from_float16_groups
    ):
        for model_param, shard in zip(model_group, shard_group):
            shards[model_param] = shard
    owned = [param for param in params if param.dtype != torch.float32]
    if not owned:
        return {}
    offsets, total = [], 0
    for param in owned:
        offsets.append(total)
        total += param.numel()
    flat = torch.zeros(total, dtype=torch.float32, device=owned[0].device)
    for param, offset in zip(owned, offsets):
        if param in shards:
            span = optimizer._get_model_param_range_map(param)["param"]
            flat[offset + span.start : offset + span.end] = shards[param]
    # Each element is owned by exactly one data-parallel rank (zeros elsewhere): a sum is exact.
    torch.distributed.all_reduce(flat, group=optimizer.data_parallel_group)
    return {
        param: flat[offset : offset + param.numel()].view(param.shape)
        for param, offset in zip(owned, offsets)
    }
