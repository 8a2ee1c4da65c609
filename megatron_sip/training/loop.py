"""The one Megatron training loop: steps, logging, evaluation, checkpoints, exit.

Every trainer (next-token pretraining, SIP, judge SFT, and the judge/rewriter trainers to come)
hands the loop what differs: a ``step`` that runs one optimizer step and returns its metrics, a
``save`` that writes a checkpoint, optionally an ``evaluate``, and how its metrics read on the
console. The loop owns the rest: the iteration and sample counters, learning-rate and timing
metrics, skipped updates, ``--log-interval``, ``--eval-interval`` / ``--eval-iters``,
``--save-interval``, the exits (``--exit-interval``, ``--exit-duration-in-mins``,
``--exit-signal-handler``: save, then return), ``--max-skipped-steps`` and the final save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Optional

import torch

from megatron_sip.log import print_rank_0
from megatron_sip.models.checkpointing import CheckpointConfig
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.exit import ExitSignalHandler, ExitTimer, all_finite
from megatron_sip.training.metrics import MetricWriter, StepLog
from megatron_sip.training.profiling import StepHousekeeping


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
    stop: Optional[str] = None
    """Why the run must not go on (a role that stopped answering): the loop saves a checkpoint
    and exits with an error naming this."""


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

    model_chunks: list = dataclasses.field(default_factory=list)
    """The trained model's chunks (for --log-params-norm)."""

    flops_per_step: Optional[float] = None
    """Model FLOPs of one step over the global batch (for --log-throughput)."""


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

    # Logging, profiling, garbage collection and memory release as Megatron-LM's loop does them.
    log = StepLog(
        writer,
        flops_per_step=trainer.flops_per_step,
        model_chunks=trainer.model_chunks,
        world_size=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
    )
    housekeeping = StepHousekeeping(writer.config)

    def validate() -> None:
        with housekeeping.evaluation():
            _log_evaluation(evaluate(), state, writer)

    signals = ExitSignalHandler(training.exit_signal) if training.exit_signal_handler else None
    timer = ExitTimer(training.exit_duration_in_mins)
    skipped_in_a_row = 0  # consecutive steps skipped for a NaN or Inf loss or gradient
    with signals or contextlib.nullcontext(), housekeeping:
        while state.iteration < training.train_iters:
            learning_rate = trainer.learning_rate()
            housekeeping.before_step(state.iteration)
            start = time.perf_counter()
            output = trainer.step(state)
            seconds = time.perf_counter() - start
            state.iteration += 1
            state.consumed_train_samples += trainer.samples_per_step
            state.skipped_updates += not output.update_successful
            housekeeping.after_step(state.iteration)

            metrics = dict(output.metrics)
            metrics["learning-rate"] = learning_rate
            metrics["batch-size"] = float(trainer.samples_per_step)
            metrics["train/update-skipped"] = float(not output.update_successful)
            metrics["train/skipped-updates"] = float(state.skipped_updates)
            line = (
                state.iteration % training.log_interval == 0
                or state.iteration == training.train_iters
            )
            shown = log.step(
                state.iteration, state.consumed_train_samples, metrics, seconds, console=line
            )
            if line:
                print_rank_0(_step_line(state, training, shown, trainer.describe(shown)))

            if evaluate is not None and state.iteration % training.eval_interval == 0:
                validate()
            if checkpoint.save_interval and state.iteration % checkpoint.save_interval == 0:
                save()

            # Bad numerics: a step whose loss or gradient was NaN or Inf left the weights and the
            # LR schedule alone (training/step.py); too many in a row and the run stops.
            nonfinite = not output.update_successful and not all_finite(output.metrics.values())
            skipped_in_a_row = skipped_in_a_row + 1 if nonfinite else 0
            if training.max_skipped_steps and skipped_in_a_row >= training.max_skipped_steps:
                save()
                _stop_on_bad_numerics(state, skipped_in_a_row, checkpoint)

            if output.stop is not None:
                save()
                where = f"checkpoint in {checkpoint.save}" if checkpoint.save else "no --save"
                print_rank_0(f"stopping at iteration {state.iteration} ({where}): {output.stop}")
                raise SystemExit(1)

            # After the last step there is nothing to stop: the run finishes as usual.
            reason = None
            if state.iteration < training.train_iters:
                reason = _exit_reason(state, training, signals, timer)
            if reason is not None:
                save()
                where = f": checkpoint in {checkpoint.save}" if checkpoint.save else ""
                print_rank_0(f"exiting at iteration {state.iteration} {reason}{where}")
                return state

    if evaluate is not None and state.iteration % training.eval_interval != 0:
        validate()
    save()
    return state


def _exit_reason(state, training, signals, timer) -> Optional[str]:
    """Why to stop early at this iteration boundary, or None. Collective: every rank takes the
    same exit at the same iteration (Megatron-LM's order: signal, duration, interval)."""
    if signals is not None and signals.received():
        caught = signals.caught.name if signals.caught else "an exit signal"
        return f"after receiving {caught} (--exit-signal-handler)"
    if timer.expired():
        return f"after {timer.elapsed_minutes:.1f} minutes (--exit-duration-in-mins)"
    if training.exit_interval and state.iteration % training.exit_interval == 0:
        return "(--exit-interval)"
    return None


def _stop_on_bad_numerics(state: TrainState, in_a_row: int, checkpoint: CheckpointConfig):
    saved = (
        f"the last good weights (those of iteration {state.iteration - in_a_row}) are saved in "
        f"{checkpoint.save} as iteration {state.iteration}, past the bad batches"
        if checkpoint.save
        else "nothing was saved (no --save)"
    )
    print_rank_0(
        f"stopping at iteration {state.iteration}: {in_a_row} steps in a row had a NaN or Inf "
        f"loss or gradient and were skipped (--max-skipped-steps {in_a_row}); {saved}. Lower "
        "--lr or --clip-grad, check the data of those iterations, or resume with a larger "
        "--max-skipped-steps"
    )
    raise SystemExit(1)


def _step_line(state, training, metrics, parts) -> str:
    head = [
        f"iteration {state.iteration:>6}/{training.train_iters}",
        f"consumed samples {state.consumed_train_samples}",
        f"elapsed time per iteration (ms) {metrics['iteration-time'] * 1000:.1f}",
    ]
    if "throughput" in metrics:
        unit = "GPU" if torch.cuda.is_available() and torch.cuda.is_initialized() else "rank"
        head.append(f"throughput per {unit} (TFLOP/s/{unit}) {metrics['throughput']:.3g}")
    head.append(f"learning rate {metrics['learning-rate']:.6E}")
    tail = []
    if metrics["train/update-skipped"]:
        tail.append("update skipped")
    if state.skipped_updates:
        tail.append(f"skipped updates {state.skipped_updates}")
    return " | ".join(head + list(parts) + tail)


def _log_evaluation(losses: dict[str, float], state: TrainState, writer: MetricWriter) -> None:
    """Megatron-LM's validation tags: ``<loss> validation`` (and ``... ppl`` with
    --log-validation-ppl-to-tensorboard), each with its ``vs samples`` twin."""
    parts, scalars = [], {}
    for name, value in losses.items():
        perplexity = math.exp(min(value, 20))
        parts.append(f"{name} {value:.6E} | {name} PPL {perplexity:.6E}")
        scalars[f"{name} validation"] = value
        if writer.config.log_validation_ppl_to_tensorboard:
            scalars[f"{name} validation ppl"] = perplexity
    writer.scalars(scalars, state.iteration)
    writer.sample_scalars(scalars, state.iteration, state.consumed_train_samples)
    print_rank_0(f"validation at iteration {state.iteration} | " + " | ".join(parts))


def describe_losses(metrics: dict[str, float]) -> list[str]:
    """Console parts of a next-token step: its losses (the flat, Megatron-LM named metrics
    that are not the loop's), loss scale, grad norm, params norm, tokens per second."""
    parts = [
        f"{name} {value:.6E}"
        for name, value in metrics.items()
        if "/" not in name and name not in _LOOP_METRICS
    ]
    if "loss-scale" in metrics:
        parts.append(f"loss scale {metrics['loss-scale']:.1f}")
    if "grad-norm" in metrics:
        parts.append(f"grad norm {metrics['grad-norm']:.4f}")
    if "params-norm" in metrics:
        parts.append(f"params norm {metrics['params-norm']:.4f}")
    if "train/tokens-per-second" in metrics:
        parts.append(f"tokens/s {metrics['train/tokens-per-second']:.0f}")
    return parts


_LOOP_METRICS = {  # flat metrics that are not losses
    "learning-rate",
    "batch-size",
    "loss-scale",
    "grad-norm",
    "params-norm",
    "iteration-time",
    "throughput",
}
