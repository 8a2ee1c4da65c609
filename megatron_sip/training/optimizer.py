"""Megatron's optimizer and learning-rate schedule from a TrainingConfig."""

from __future__ import annotations

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
