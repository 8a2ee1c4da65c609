"""The one training loop: counters, skipped updates, evaluation, checkpoints and exit, with a
scripted trainer (every trainer hands the loop the same few callables)."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest

from megatron_sip.models.checkpointing import CheckpointConfig
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.loop import StepOutput, Trainer, TrainState, describe_losses, train
from megatron_sip.training.metrics import LoggingConfig, MetricWriter


class Recorder(MetricWriter):
    def __init__(self, config: LoggingConfig | None = None):
        super().__init__(config or LoggingConfig())
        self.values: dict[int, dict] = {}

    def scalars(self, values, step):
        self.values.setdefault(step, {}).update(values)


def scripted(skipped_at=(), evaluations=None):
    saves, steps = [], []

    def step(state: TrainState) -> StepOutput:
        steps.append(state.iteration)
        return StepOutput(
            {"lm loss": 1.0 / (state.iteration + 1)}, state.iteration + 1 not in skipped_at
        )

    def evaluate():
        evaluations.append(len(steps))
        return {"lm loss": 0.5}

    trainer = Trainer(
        step=step,
        save=lambda state: saves.append(state.iteration),
        learning_rate=lambda: 1e-3,
        samples_per_step=8,
        evaluate=evaluate if evaluations is not None else None,
        describe=describe_losses,
    )
    return trainer, saves, steps


def test_loop_counts_steps_samples_and_skipped_updates(capsys):
    trainer, saves, steps = scripted(skipped_at=(2, 5))
    writer = Recorder()
    training = TrainingConfig(train_iters=6, log_interval=3, eval_iters=0)
    state = train(trainer, TrainState(), training, CheckpointConfig(save="ckpt"), writer)
    assert (state.iteration, state.consumed_train_samples, state.skipped_updates) == (6, 48, 2)
    assert steps == [0, 1, 2, 3, 4, 5]  # each step sees the iterations done before it
    assert [writer.values[i]["train/update-skipped"] for i in range(1, 7)] == [0, 1, 0, 0, 1, 0]
    assert writer.values[6]["train/skipped-updates"] == 2
    assert saves == [6]  # the final checkpoint only (no --save-interval)
    assert state.checkpoint_extra() == {"consumed_train_samples": 48, "skipped_updates": 2}
    lines = [line for line in capsys.readouterr().out.splitlines() if "iteration" in line]
    assert len(lines) == 2 and "skipped updates 2" in lines[1] and "lm loss" in lines[0]


def test_loop_evaluates_saves_and_exits_on_its_intervals():
    evaluations = []
    trainer, saves, steps = scripted(evaluations=evaluations)
    training = TrainingConfig(train_iters=10, eval_interval=4, eval_iters=1, exit_interval=6)
    checkpoint = CheckpointConfig(save="ckpt", save_interval=3)
    writer = Recorder()
    state = train(trainer, TrainState(), training, checkpoint, writer)
    assert state.iteration == 6 and saves == [3, 6]  # exits after saving at 6
    assert evaluations == [4] and writer.values[4]["lm loss validation"] == 0.5
    # Resumed: the rest of the run, evaluating at 8 and at the end.
    state = train(trainer, state, TrainingConfig(train_iters=10, eval_interval=4, eval_iters=1),
                  checkpoint, writer)  # fmt: skip
    assert state.iteration == 10 and saves == [3, 6, 9, 10] and evaluations == [4, 8, 10]
    # --eval-iters 0: no evaluation at all.
    evaluations.clear()
    train(trainer, TrainState(), TrainingConfig(train_iters=2, eval_iters=0), checkpoint, writer)
    assert evaluations == []


def _signalling_step(at: int, signum: int):
    """A scripted step that signals this process during the step numbered ``at``."""

    def step(state: TrainState) -> StepOutput:
        if state.iteration + 1 == at:
            os.kill(os.getpid(), signum)
        return StepOutput({"lm loss": 1.0})

    return step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_exit_signal_saves_the_current_iteration_and_returns(signum, capsys):
    trainer, saves, _ = scripted()
    trainer.step = _signalling_step(at=3, signum=signum)
    training = TrainingConfig(train_iters=10, eval_iters=0, exit_signal_handler=True)
    before = signal.getsignal(signum)
    state = train(trainer, TrainState(), training, CheckpointConfig(save="ckpt"), Recorder())
    assert state.iteration == 3 and saves == [3]
    assert f"exiting at iteration 3 after receiving {signal.Signals(signum).name}" in (
        capsys.readouterr().out
    )
    assert signal.getsignal(signum) == before  # the loop's handler is gone afterwards


def test_exit_duration_saves_and_returns():
    trainer, saves, _ = scripted()
    step = trainer.step

    def slow_step(state):
        time.sleep(0.05)
        return step(state)

    trainer.step = slow_step
    training = TrainingConfig(train_iters=50, eval_iters=0, exit_duration_in_mins=0.1 / 60)
    state = train(trainer, TrainState(), training, CheckpointConfig(save="ckpt"), Recorder())
    assert 2 <= state.iteration < 50 and saves == [state.iteration]


def test_nonfinite_steps_are_counted_and_too_many_in_a_row_stop_the_run(capsys):
    """A step reported as skipped with a NaN/Inf metric counts toward --max-skipped-steps; a good
    step in between resets the count; the stop saves, names the flag and exits 1."""
    saves, bad = [], {2, 4, 5, 6}

    def step(state: TrainState) -> StepOutput:
        if state.iteration + 1 in bad:
            return StepOutput({"lm loss": math.nan, "grad-norm": math.nan}, False)
        return StepOutput({"lm loss": 1.0, "grad-norm": 0.5})

    trainer = Trainer(step, lambda state: saves.append(state.iteration), lambda: 1e-3, 8)
    training = TrainingConfig(train_iters=10, eval_iters=0, max_skipped_steps=3)
    state = TrainState()
    writer = Recorder()
    with pytest.raises(SystemExit) as stopped:
        train(trainer, state, training, CheckpointConfig(save="ckpt"), writer)
    assert stopped.value.code == 1
    assert state.iteration == 6 and state.skipped_updates == 4 and saves == [6]
    assert [writer.values[i]["train/update-skipped"] for i in range(1, 7)] == [0, 1, 0, 1, 1, 1]
    out = capsys.readouterr().out
    assert "stopping at iteration 6: 3 steps in a row" in out and "--max-skipped-steps" in out
    assert "those of iteration 3" in out
    # A skip with finite metrics (fp16's loss scaler backing off) does not count.
    trainer.step = lambda state: StepOutput({"lm loss": 1.0}, False)
    state = train(trainer, TrainState(), training, CheckpointConfig(), writer)
    assert state.iteration == 10 and state.skipped_updates == 10
