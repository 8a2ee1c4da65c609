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
    optimizer = get_megatron_optimizer(optimizer_config(training), model_chunks)
    scheduler = OptimizerParamScheduler(
        optimizer, **scheduler_arguments(training, data_parallel_size)
    )
    return optimizer, scheduler


def optimizer_config(training: TrainingConfig) -> OptimizerConfig:
    """Megatron-Core's OptimizerConfig for ``training`` (with --decoupled-lr, Megatron-Core's
    standard parameter-group overrides give the embedding and output layer their own LR)."""
    if training.fp16:
        params_dtype = torch.float16
    elif training.bf16:
        params_dtype = torch.bfloat16
    else:
        params_dtype = torch.float32
    return OptimizerConfig(
        optimizer=training.optimizer,
        lr=training.lr,
        min_lr=training.min_lr,
        decoupled_lr=training.decoupled_lr,
        decoupled_min_lr=training.decoupled_min_lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_eps=training.adam_eps,
        clip_grad=training.clip_grad,
        fp16=training.fp16,
        bf16=training.bf16,
        params_dtype=params_dtype,
        loss_scale=training.loss_scale,
        initial_loss_scale=training.initial_loss_scale,
        min_loss_scale=training.min_loss_scale,
        loss_scale_window=training.loss_scale_window,
        hysteresis=training.hysteresis,
        use_distributed_optimizer=training.use_distributed_optimizer,
        overlap_param_gather=training.overlap_param_gather,
    )


def scheduler_arguments(training: TrainingConfig, data_parallel_size: int) -> dict:
    """OptimizerParamScheduler's arguments, computed as Megatron-LM's
    ``get_optimizer_param_scheduler``: schedule steps count samples (so the schedule survives
    batch-size changes); iteration-based flags are multiplied by the global batch size,
    sample-based ones are taken as they are."""
    global_batch = training.global_batch(data_parallel_size)
    train_iters = training.set_train_iters(data_parallel_size)
    if training.train_samples is not None:
        decay_steps = training.lr_decay_samples or training.train_samples
        warmup_steps = training.lr_warmup_samples
        wsd_decay_steps = training.lr_wsd_decay_samples
        wd_incr_steps = training.train_samples
    else:
        decay_steps = (training.lr_decay_iters or train_iters) * global_batch
        warmup_steps = training.lr_warmup_iters * global_batch
        wsd_decay_steps = (
            training.lr_wsd_decay_iters * global_batch
            if training.lr_wsd_decay_iters is not None
            else None
        )
        wd_incr_steps = train_iters * global_batch
    if training.lr_warmup_fraction is not None:
        warmup_steps = training.lr_warmup_fraction * decay_steps
    if decay_steps <= warmup_steps:
        # Megatron-Core asserts warm-up < decay; a run shorter than its warm-up (tests, smoke
        # runs) decays over one step after it, as before.
        decay_steps = int(warmup_steps) + global_batch
    return dict(
        init_lr=training.lr_warmup_init,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=max(wd_incr_steps, 1),
        wd_incr_style="constant",
        wsd_decay_steps=wsd_decay_steps,
        lr_wsd_decay_style=training.lr_wsd_decay_style,
    )


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
