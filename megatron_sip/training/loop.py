"""The one Megatron training loop: steps, logging, evaluation, checkpoints, exit.

Every trainer (next-token pretraining, SIP, judge SFT, and the judge/rewriter trainers to come)
hands the loop what differs: a ``step`` that runs one optimizer step and returns its metrics, a
``save`` that writes a checkpoint, optionally an ``evaluate``, and how its metrics read on the
console. The loop owns the rest: the iteration and sample counters, learning-rate and timing
metrics, skipped updates, ``--log-interval``, ``--eval-interval`` / ``--eval-iters``,
``--save-interval``, ``--exit-interval`` and the final save.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Optional

from megatron_sip.log import print_rank_0
from megatron_sip.models.checkpointing import CheckpointConfig
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.metrics import MetricWriter


@dataclasses.dataclass
class TrainState:
    """What a checkpoint must restore besides model, optimizer, schedule and RNG."""

    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_updates: int = 0  # optimizer steps skipped (gradient overflow or NaN)

    def checkpoint_extra(self) -> dict:
        return {
            "consumed_train_samples": self.consumed_train_samples,
            "skipped_updates": self.skipped_updates,
        }

    def restore(self, iteration: int, extra: dict) -> None:
        self.iteration = iteration
        self.consumed_train_samples = extra.get("consumed_train_samples", 0)
        self.skipped_updates = extra.get("skipped_updates", 0)


@dataclasses.dataclass
class StepOutput:
    """One optimizer step's metrics ({name: value}, the same on every rank)."""

    metrics: dict[str, float]
    update_successful: bool = True


@dataclasses.dataclass
class Trainer:
    """What a trainer gives the loop."""

    step: Callable[[TrainState], StepOutput]
    """Runs one optimizer step over the global batch (``state.iteration`` steps are done)."""

    save: Callable[[TrainState], None]
    """Writes a checkpoint of ``state`` (collective)."""

    learning_rate: Callable[[], float]
    """The learning rate the next step uses."""

    samples_per_step: int
    """Global batch size: samples consumed per step."""

    evaluate: Optional[Callable[[], dict[str, float]]] = None
    """Validation metrics {name: value} (forward only); None: the trainer has no validation."""

    describe: Callable[[dict[str, float]], list[str]] = lambda metrics: []
    """The trainer's part of the console line, from its step metrics."""


def train(
    trainer: Trainer,
    state: TrainState,
    training: TrainingConfig,
    checkpoint: CheckpointConfig,
    writer: MetricWriter,
) -> TrainState:
    """Steps until ``--train-iters`` (or ``--exit-interval``); returns the final state."""
    evaluate = trainer.evaluate if training.eval_iters > 0 else None
    saved_at = None

    def save() -> None:
        nonlocal saved_at
        if checkpoint.save and saved_at != state.iteration:
            trainer.save(state)
            saved_at = state.iteration

    while state.iteration < training.train_iters:
        learning_rate = trainer.learning_rate()
        start = time.perf_counter()
        output = trainer.step(state)
        seconds = time.perf_counter() - start
        state.iteration += 1
        state.consumed_train_samples += trainer.samples_per_step
        state.skipped_updates += not output.update_successful

        metrics = dict(output.metrics)
        metrics["train/learning-rate"] = learning_rate
        metrics["train/seconds-per-step"] = seconds
        metrics["train/update-skipped"] = float(not output.update_successful)
        metrics["train/skipped-updates"] = float(state.skipped_updates)
        writer.scalars(metrics, state.iteration)
        if state.iteration % training.log_interval == 0 or state.iteration == training.train_iters:
            print_rank_0(_step_line(state, training, metrics, trainer.describe(metrics)))

        if evaluate is not None and state.iteration % training.eval_interval == 0:
            _log_evaluation(evaluate(), state.iteration, writer)
        if checkpoint.save_interval and state.iteration % checkpoint.save_interval == 0:
            save()
        if training.exit_interval and state.iteration % training.exit_interval == 0:
            save()
            print_rank_0(f"exiting at iteration {state.iteration} (--exit-interval)")
            return state

    if evaluate is not None and state.iteration % training.eval_interval != 0:
        _log_evaluation(evaluate(), state.iteration, writer)
    save()
    return state


def _step_line(state, training, metrics, parts) -> str:
    head = [
        f"iteration {state.iteration:>6}/{training.train_iters}",
        f"consumed samples {state.consumed_train_samples}",
        f"elapsed time per iteration (ms) {metrics['train/seconds-per-step'] * 1000:.1f}",
        f"learning rate {metrics['train/learning-rate']:.6E}",
    ]
    tail = []
    if metrics["train/update-skipped"]:
        tail.append("update skipped")
    if state.skipped_updates:
        tail.append(f"skipped updates {state.skipped_updates}")
    return " | ".join(head + list(parts) + tail)


def _log_evaluation(losses: dict[str, float], iteration: int, writer: MetricWriter) -> None:
    parts = []
    for name, value in losses.items():
        parts.append(f"{name} {value:.6E} | {name} PPL {math.exp(min(value, 20)):.6E}")
        writer.scalars({f"validation/{name}": value}, iteration)
    print_rank_0(f"validation at iteration {iteration} | " + " | ".join(parts))


def describe_losses(metrics: dict[str, float]) -> list[str]:
    """Console parts of a next-token step: its losses, grad norm, throughput."""
    parts = [
        f"{name[len('train/') :]} {value:.6E}"
        for name, value in metrics.items()
        if name.startswith("train/") and name[len("train/") :] not in _LOOP_METRICS
    ]
    if "train/grad-norm" in metrics:
        parts.append(f"grad norm {metrics['train/grad-norm']:.4f}")
    if "train/tokens-per-second" in metrics:
        parts.append(f"tokens/s {metrics['train/tokens-per-second']:.0f}")
    if "train/tflops-per-gpu" in metrics:
        parts.append(f"TFLOP/s/GPU {metrics['train/tflops-per-gpu']:.1f}")
    return parts


_LOOP_METRICS = {
    "learning-rate",
    "seconds-per-step",
    "update-skipped",
    "skipped-updates",
    "grad-norm",
    "tokens-per-second",
    "tflops-per-gpu",
}
