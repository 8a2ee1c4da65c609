"""Batch, optimizer, learning-rate schedule and precision settings."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from megatron_sip.errors import ConfigError, require_choice, require_positive

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


@dataclasses.dataclass
class TrainingConfig:
    """How the model is optimised."""

    micro_batch_size: int = 1
    """Samples per micro-batch on each data-parallel rank."""

    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all data-parallel ranks. Default: micro-batch size x
    data-parallel size. Must be a multiple of that product (the rest is gradient accumulation)."""

    train_iters: int = 0
    """Optimizer steps to train for."""

    lr: float = 1e-4
    """Peak learning rate."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay."""

    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root"] = "linear"
    """Learning-rate decay after warm-up."""

    lr_warmup_iters: int = 0
    """Linear warm-up steps from 0 to --lr."""

    lr_decay_iters: Optional[int] = None
    """Steps over which the learning rate decays. Default: --train-iters."""

    optimizer: Literal["adam", "sgd"] = "adam"
    """Optimizer (adam is AdamW: decoupled weight decay)."""

    weight_decay: float = 0.01
    """Decoupled weight decay."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.999
    """Adam beta2."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    clip_grad: float = 1.0
    """Clip gradients to this global L2 norm (0 disables clipping)."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""

    bf16: bool = False
    """bfloat16 parameters and activations with fp32 main weights in the optimizer."""

    seed: int = 1234
    """Random seed for weights, data order and sampling."""

    log_interval: int = 100
    """Log training metrics every this many steps."""

    eval_interval: int = 1000
    """Evaluate on the validation split every this many steps (and at the end)."""

    eval_iters: int = 10
    """Validation batches per evaluation (0 disables evaluation)."""

    exit_interval: Optional[int] = None
    """Stop after the step whose number is a multiple of this (saving a checkpoint first when
    --save is set), e.g. to end a job before its time limit."""

    def __post_init__(self):
        require_positive("--micro-batch-size", self.micro_batch_size)
        if self.global_batch_size is not None:
            require_positive("--global-batch-size", self.global_batch_size)
        require_choice("--lr-decay-style", self.lr_decay_style, LR_DECAY_STYLES)
        require_choice("--optimizer", self.optimizer, ("adam", "sgd"))
        if self.train_iters < 0:
            raise ConfigError("--train-iters", f"must be >= 0, got {self.train_iters}")
        if self.min_lr > self.lr:
            raise ConfigError("--min-lr", f"{self.min_lr} is above --lr {self.lr}")
        if self.clip_grad < 0:
            raise ConfigError("--clip-grad", "must be >= 0 (0 disables clipping)")
        require_positive("--log-interval", self.log_interval)
        require_positive("--eval-interval", self.eval_interval)
        if self.eval_iters < 0:
            raise ConfigError("--eval-iters", f"must be >= 0, got {self.eval_iters}")
        if self.exit_interval is not None:
            require_positive("--exit-interval", self.exit_interval)
        if self.optimizer == "sgd":
            for flag, value, default in (
                ("--adam-beta1", self.adam_beta1, 0.9),
                ("--adam-beta2", self.adam_beta2, 0.999),
                ("--adam-eps", self.adam_eps, 1e-8),
            ):
                if value != default:
                    raise ConfigError(flag, "only applies to --optimizer adam")
        if self.lr_decay_style == "constant":
            if self.min_lr not in (0.0, self.lr):
                raise ConfigError(
                    "--min-lr", "has no effect with --lr-decay-style constant (the LR stays --lr)"
                )
            if self.lr_decay_iters is not None:
                raise ConfigError(
                    "--lr-decay-iters", "has no effect with --lr-decay-style constant"
                )

    def global_batch(self, data_parallel_size: int) -> int:
        return self.global_batch_size or self.micro_batch_size * data_parallel_size

    def num_microbatches(self, data_parallel_size: int) -> int:
        return self.global_batch(data_parallel_size) // (self.micro_batch_size * data_parallel_size)
