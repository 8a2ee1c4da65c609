"""Batch, optimizer, learning-rate schedule and precision settings."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from megatron_sip.errors import ConfigError, require_choice, require_positive

EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
LR_WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")


@dataclasses.dataclass
class TrainingConfig:
    """How the model is optimised."""

    micro_batch_size: int = 1
    """Samples per micro-batch on each data-parallel rank."""

    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all data-parallel ranks. Default: micro-batch size x
    data-parallel size. Must be a multiple of that product (the rest is gradient accumulation)."""

    rampup_batch_size: Optional[list[int]] = None
    """Megatron-LM's batch-size ramp-up `START INCREMENT SAMPLES`. Refused: this loop trains at
    a constant global batch size."""

    train_iters: Optional[int] = None
    """Optimizer steps to train for. One of --train-iters and --train-samples is required to
    train."""

    train_samples: Optional[int] = None
    """Samples to train for (sample-based training, as Megatron-LM): the run takes
    `train_samples // global_batch_size` steps and the --lr-*-samples flags set its schedule."""

    lr: float = 1e-4
    """Peak learning rate."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay."""

    decoupled_lr: Optional[float] = None
    """Separate peak learning rate for the input embedding and output layer (Megatron-Core's
    optimizer puts them in their own parameter groups)."""

    decoupled_min_lr: Optional[float] = None
    """Minimum learning rate for the input embedding and output layer (with --decoupled-lr)."""

    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "linear"
    """Learning-rate decay after warm-up. WSD (warmup-stable-decay) holds --lr until the last
    --lr-wsd-decay-iters/-samples of the decay, then anneals with --lr-wsd-decay-style."""

    lr_wsd_decay_style: Literal["exponential", "linear", "cosine", "minus_sqrt"] = "exponential"
    """Annealing shape of the WSD decay phase."""

    lr_warmup_iters: int = 0
    """Linear warm-up steps from --lr-warmup-init to --lr."""

    lr_warmup_samples: int = 0
    """Linear warm-up samples (sample-based training)."""

    lr_warmup_fraction: Optional[float] = None
    """Warm-up as a fraction of the decay steps (instead of --lr-warmup-iters/-samples)."""

    lr_warmup_init: float = 0.0
    """Learning rate at the start of the warm-up."""

    lr_decay_iters: Optional[int] = None
    """Steps over which the learning rate decays. Default: --train-iters."""

    lr_decay_samples: Optional[int] = None
    """Samples over which the learning rate decays (sample-based training). Default:
    --train-samples."""

    lr_wsd_decay_iters: Optional[int] = None
    """Steps of the WSD annealing phase (the end of the decay)."""

    lr_wsd_decay_samples: Optional[int] = None
    """Samples of the WSD annealing phase (sample-based training)."""

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

    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass (Megatron-Core's DDP
    launches each bucket's reduction as soon as its gradients are ready)."""

    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass.
    Needs --use-distributed-optimizer and --overlap-grad-reduce."""

    bf16: bool = False
    """bfloat16 parameters and activations with fp32 main weights in the optimizer."""

    fp16: bool = False
    """float16 parameters and activations with fp32 main weights and loss scaling (steps whose
    gradients overflow are skipped and the dynamic loss scale lowered)."""

    grad_reduce_in_bf16: bool = False
    """Accumulate and reduce gradients in bfloat16 instead of fp32 (with --bf16)."""

    loss_scale: Optional[float] = None
    """Static loss scale for --fp16 (a power of 2). Default: dynamic loss scaling."""

    initial_loss_scale: float = 2**32
    """Initial dynamic loss scale (--fp16)."""

    min_loss_scale: float = 1.0
    """Lower bound of the dynamic loss scale (--fp16)."""

    loss_scale_window: float = 1000
    """Steps without overflow after which the dynamic loss scale doubles (--fp16)."""

    hysteresis: int = 2
    """Overflowing steps tolerated before the dynamic loss scale is halved (--fp16)."""

    calculate_per_token_loss: bool = False
    """Average the loss over every token of the global batch (Megatron-Core divides the summed
    gradients by the global token count) instead of averaging per micro-batch."""

    seed: int = 1234
    """Random seed for weights, data order and sampling."""

    log_interval: int = 100
    """Log training metrics every this many steps."""

    eval_interval: int = 1000
    """Evaluate on the validation split every this many steps (and at the end)."""

    eval_iters: int = 100
    """Validation batches per evaluation (0 disables evaluation)."""

    exit_interval: Optional[int] = None
    """Stop after the step whose number is a multiple of this (saving a checkpoint first when
    --save is set), e.g. to end a job before its time limit."""

    exit_duration_in_mins: Optional[float] = None
    """Stop (saving a checkpoint first when --save is set, then exit 0) at the first iteration
    boundary after this many minutes of training; all ranks agree on the moment."""

    exit_signal_handler: bool = False
    """On --exit-signal (and SIGUSR1, which `sbatch --signal=USR1@SECS` sends before the time
    limit) save a checkpoint at the current iteration on every rank and exit 0."""

    exit_signal: Literal["SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2"] = "SIGTERM"
    """The signal --exit-signal-handler waits for (besides SIGUSR1)."""

    max_skipped_steps: int = 10
    """Stop (saving the last good state when --save is set, then exit 1) after this many
    consecutive steps skipped for a NaN or Inf loss or gradient (0: never stop)."""

    def __post_init__(self):
        require_positive("--micro-batch-size", self.micro_batch_size)
        if self.global_batch_size is not None:
            require_positive("--global-batch-size", self.global_batch_size)
        require_choice("--lr-decay-style", self.lr_decay_style, LR_DECAY_STYLES)
        require_choice("--optimizer", self.optimizer, ("adam", "sgd"))
        if self.train_iters is not None and self.train_iters < 0:
            raise ConfigError("--train-iters", f"must be >= 0, got {self.train_iters}")
        self._check_schedule()
        self._check_precision()
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
        if self.exit_duration_in_mins is not None and self.exit_duration_in_mins <= 0:
            raise ConfigError("--exit-duration-in-mins", "must be positive")
        require_choice("--exit-signal", self.exit_signal, EXIT_SIGNALS)
        if self.max_skipped_steps < 0:
            raise ConfigError("--max-skipped-steps", "must be >= 0 (0: never stop)")
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
            for flag, value in (
                ("--lr-decay-iters", self.lr_decay_iters),
                ("--lr-decay-samples", self.lr_decay_samples),
            ):
                if value is not None:
                    raise ConfigError(flag, "has no effect with --lr-decay-style constant")

    def _check_schedule(self) -> None:
        """Megatron-LM's rules: iteration-based and sample-based flags do not mix."""
        require_choice("--lr-wsd-decay-style", self.lr_wsd_decay_style, LR_WSD_DECAY_STYLES)
        if self.train_iters is not None and self.train_samples is not None:
            raise ConfigError("--train-samples", "give --train-iters or --train-samples, not both")
        if self.train_samples is not None:
            require_positive("--train-samples", self.train_samples)
            for flag, value in (
                ("--lr-decay-iters", self.lr_decay_iters),
                ("--lr-warmup-iters", self.lr_warmup_iters or None),
                ("--lr-wsd-decay-iters", self.lr_wsd_decay_iters),
            ):
                if value is not None:
                    raise ConfigError(
                        flag,
                        "iteration-based schedule flag with --train-samples; use its -samples form",
                    )
        else:
            for flag, value in (
                ("--lr-decay-samples", self.lr_decay_samples),
                ("--lr-warmup-samples", self.lr_warmup_samples or None),
                ("--lr-wsd-decay-samples", self.lr_wsd_decay_samples),
            ):
                if value is not None:
                    raise ConfigError(
                        flag, "sample-based schedule flag needs --train-samples (not --train-iters)"
                    )
        if self.lr_warmup_fraction is not None:
            if not 0.0 <= self.lr_warmup_fraction < 1.0:
                raise ConfigError(
                    "--lr-warmup-fraction", f"must be in [0, 1), got {self.lr_warmup_fraction}"
                )
            if self.lr_warmup_iters or self.lr_warmup_samples:
                flag = "--lr-warmup-iters" if self.lr_warmup_iters else "--lr-warmup-samples"
                raise ConfigError(flag, "give --lr-warmup-fraction or this flag, not both")
        if self.lr_warmup_init > self.lr:
            raise ConfigError("--lr-warmup-init", f"{self.lr_warmup_init} is above --lr {self.lr}")
        if self.lr_decay_style == "WSD":
            if self.lr_wsd_decay_iters is None and self.lr_wsd_decay_samples is None:
                flag = "--lr-wsd-decay-samples" if self.train_samples else "--lr-wsd-decay-iters"
                raise ConfigError(flag, "--lr-decay-style WSD needs the length of its decay phase")
        elif self.lr_wsd_decay_iters is not None or self.lr_wsd_decay_samples is not None:
            flag = "--lr-wsd-decay-iters" if self.lr_wsd_decay_iters else "--lr-wsd-decay-samples"
            raise ConfigError(flag, "only applies to --lr-decay-style WSD")
        if self.decoupled_min_lr is not None and self.decoupled_lr is None:
            raise ConfigError("--decoupled-min-lr", "only applies with --decoupled-lr")
        if self.decoupled_lr is not None and (self.decoupled_min_lr or 0.0) > self.decoupled_lr:
            raise ConfigError(
                "--decoupled-min-lr",
                f"{self.decoupled_min_lr} is above --decoupled-lr {self.decoupled_lr}",
            )
        if self.rampup_batch_size is not None:
            if self.train_samples is None:
                # Megatron-LM's own rule.
                raise ConfigError(
                    "--rampup-batch-size", "batch-size ramp-up needs --train-samples training"
                )
            raise ConfigError(
                "--rampup-batch-size",
                "batch-size ramp-up is not implemented here (the training loop and its data "
                "order assume a constant --global-batch-size); drop it",
            )

    def _check_precision(self) -> None:
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16", "give --fp16 or --bf16, not both")
        if self.grad_reduce_in_bf16 and not self.bf16:
            raise ConfigError(
                "--grad-reduce-in-bf16", "only applies to --bf16 (gradients are fp32 otherwise)"
            )
        if not self.fp16:
            for flag, value, default in (
                ("--loss-scale", self.loss_scale, None),
                ("--initial-loss-scale", self.initial_loss_scale, 2**32),
                ("--min-loss-scale", self.min_loss_scale, 1.0),
                ("--loss-scale-window", self.loss_scale_window, 1000),
                ("--hysteresis", self.hysteresis, 2),
            ):
                if value != default:
                    raise ConfigError(flag, "loss scaling only applies to --fp16")
        if self.loss_scale is not None:
            require_positive("--loss-scale", self.loss_scale)
        require_positive("--initial-loss-scale", self.initial_loss_scale)
        require_positive("--loss-scale-window", self.loss_scale_window)
        require_positive("--hysteresis", self.hysteresis)
        if self.overlap_param_gather:
            # As Megatron-LM: the gather being overlapped is the distributed optimizer's, and it
            # is launched from the gradient-reduction buckets.
            if not self.use_distributed_optimizer:
                raise ConfigError(
                    "--overlap-param-gather",
                    "needs --use-distributed-optimizer (it overlaps the "
                    "distributed optimizer's parameter all-gather)",
                )
            if not self.overlap_grad_reduce:
                raise ConfigError("--overlap-param-gather", "needs --overlap-grad-reduce")

    def set_train_iters(self, data_parallel_size: int) -> int:
        """Steps to train for: --train-iters, or (as Megatron-LM's ``update_train_iters`` at a
        constant batch size) --train-samples // global batch size. Sets ``train_iters``."""
        if self.train_samples is not None:
            global_batch = self.global_batch(data_parallel_size)
            if self.train_samples < global_batch:
                raise ConfigError(
                    "--train-samples",
                    f"{self.train_samples} is less than one global batch ({global_batch})",
                )
            self.train_iters = self.train_samples // global_batch
        if self.train_iters is None:
            raise ConfigError("--train-iters", "give --train-iters or --train-samples to train")
        return self.train_iters

    def global_batch(self, data_parallel_size: int) -> int:
        return self.global_batch_size or self.micro_batch_size * data_parallel_size

    def num_microbatches(self, data_parallel_size: int) -> int:
        return self.global_batch(data_parallel_size) // (self.micro_batch_size * data_parallel_size)
