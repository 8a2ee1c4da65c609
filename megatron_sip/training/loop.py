"""The generic Megatron training loop: steps, logging, evaluation, checkpoints, exit.

What is trained (model, loss, data) comes in as arguments, so the plain pretraining entry point
and the SIP trainer share this loop.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Optional

import torch

from megatron_sip.log import print_rank_0
from megatron_sip.models.checkpointing import CheckpointConfig, save_checkpoint
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.metrics import MetricWriter
from megatron_sip.training.step import broadcast_from_last_stage, forward_backward, train_step

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainState:
    """What a checkpoint must restore besides model/optimizer/schedule/RNG."""

    iteration: int = 0
    consumed_train_samples: int = 0

    def as_checkpoint_extra(self) -> dict:
        return {"consumed_train_samples": self.consumed_train_samples}


@dataclasses.dataclass
class LoopInputs:
    """Everything the loop steps over."""

    forward_step_func: Callable
    model_chunks: list
    optimizer: object
    scheduler: object
    train_batches: Iterator[dict]
    valid_batches: Optional[Callable[[], Iterator[dict]]]  # a fresh iterator per evaluation
    seq_length: int
    data_parallel_size: int
    flops_per_sample: Optional[float] = None  # reported as TFLOP/s per GPU when set
    checkpoint_metadata: Optional[dict] = None  # saved with every checkpoint (e.g. model args)


def evaluate(inputs: LoopInputs, training: TrainingConfig) -> dict[str, float]:
    """Mean validation losses over ``--eval-iters`` global batches (forward only)."""
    for chunk in inputs.model_chunks:
        chunk.eval()
    batches = inputs.valid_batches()
    reports = []
    for _ in range(training.eval_iters):
        reports += forward_backward(
            inputs.forward_step_func,
            batches,
            inputs.model_chunks,
            num_microbatches=training.num_microbatches(inputs.data_parallel_size),
            seq_length=inputs.seq_length,
            micro_batch_size=training.micro_batch_size,
            forward_only=True,
        )
    for chunk in inputs.model_chunks:
        chunk.train()
    return broadcast_from_last_stage(reports)


def _log_evaluation(losses: dict[str, float], iteration: int, writer: MetricWriter) -> None:
    parts = []
    for name, value in losses.items():
        parts.append(f"{name} {value:.6E} | {name} PPL {math.exp(min(value, 20)):.6E}")
        writer.scalars({f"validation/{name}": value}, iteration)
    print_rank_0(f"validation at iteration {iteration} | " + " | ".join(parts))


def train(
    inputs: LoopInputs,
    state: TrainState,
    training: TrainingConfig,
    checkpoint: CheckpointConfig,
    writer: MetricWriter,
) -> TrainState:
    """Trains until ``--train-iters`` (or ``--exit-interval``); returns the final state."""
    global_batch = training.global_batch(inputs.data_parallel_size)
    num_microbatches = training.num_microbatches(inputs.data_parallel_size)
    can_evaluate = inputs.valid_batches is not None and training.eval_iters > 0
    saved_at = None

    def save():
        nonlocal saved_at
        if checkpoint.save and saved_at != state.iteration:
            save_checkpoint(
                checkpoint.save,
                state.iteration,
                inputs.model_chunks,
                inputs.optimizer,
                inputs.scheduler,
                extra_common={**(inputs.checkpoint_metadata or {}), **state.as_checkpoint_extra()},
            )
            saved_at = state.iteration

    while state.iteration < training.train_iters:
        learning_rate = inputs.optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        result = train_step(
            inputs.forward_step_func,
            inputs.train_batches,
            inputs.model_chunks,
            inputs.optimizer,
            inputs.scheduler,
            num_microbatches=num_microbatches,
            seq_length=inputs.seq_length,
            micro_batch_size=training.micro_batch_size,
            samples_per_step=global_batch,
        )
        seconds = time.perf_counter() - start
        state.iteration += 1
        state.consumed_train_samples += global_batch

        metrics = {f"train/{name}": value for name, value in result.losses.items()}
        metrics["train/learning-rate"] = learning_rate
        if result.grad_norm is not None:
            metrics["train/grad-norm"] = result.grad_norm
        metrics["train/tokens-per-second"] = global_batch * inputs.seq_length / seconds
        if inputs.flops_per_sample:
            world = torch.distributed.get_world_size()
            metrics["train/tflops-per-gpu"] = (
                inputs.flops_per_sample * global_batch / seconds / world / 1e12
            )
        writer.scalars(metrics, state.iteration)
        if state.iteration % training.log_interval == 0 or state.iteration == training.train_iters:
            _log_step(state, training, metrics, seconds, result.update_successful)

        if can_evaluate and state.iteration % training.eval_interval == 0:
            _log_evaluation(evaluate(inputs, training), state.iteration, writer)
        if checkpoint.save_interval and state.iteration % checkpoint.save_interval == 0:
            save()
        if training.exit_interval and state.iteration % training.exit_interval == 0:
            save()
            print_rank_0(f"exiting at iteration {state.iteration} (--exit-interval)")
            return state

    if can_evaluate and state.iteration % training.eval_interval != 0:
        _log_evaluation(evaluate(inputs, training), state.iteration, writer)
    save()
    return state


def _log_step(state, training, metrics, seconds, update_successful) -> None:
    parts = [
        f"iteration {state.iteration:>6}/{training.train_iters}",
        f"consumed samples {state.consumed_train_samples}",
        f"elapsed per step (ms) {seconds * 1000:.1f}",
        f"learning rate {metrics['train/learning-rate']:.6E}",
    ]
    parts += [
        f"{name[len('train/') :]} {value:.6E}"
        for name, value in metrics.items()
        if name not in ("train/learning-rate", "train/tokens-per-second", "train/tflops-per-gpu")
        and name != "train/grad-norm"
    ]
    if "train/grad-norm" in metrics:
        parts.append(f"grad norm {metrics['train/grad-norm']:.4f}")
    parts.append(f"tokens/s {metrics['train/tokens-per-second']:.0f}")
    if "train/tflops-per-gpu" in metrics:
        parts.append(f"TFLOP/s/GPU {metrics['train/tflops-per-gpu']:.1f}")
    if not update_successful:
        parts.append("update skipped")
    print_rank_0(" | ".join(parts))
