"""The one training loop: counters, skipped updates, evaluation, checkpoints and exit, with a
scripted trainer (every trainer hands the loop the same few callables)."""

from __future__ import annotations

from megatron_sip.models.checkpointing import CheckpointConfig
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.loop import StepOutput, Trainer, TrainState, describe_losses, train


class Recorder:
    def __init__(self):
        self.values: dict[int, dict] = {}

    def scalars(self, values, step):
        self.values.setdefault(step, {}).update(values)


def scripted(skipped_at=(), evaluations=None):
    saves, steps = [], []

    def step(state: TrainState) -> StepOutput:
        steps.append(state.iteration)
        return StepOutput(
            {"train/lm loss": 1.0 / (state.iteration + 1)}, state.iteration + 1 not in skipped_at
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
    assert evaluations == [4] and writer.values[4]["validation/lm loss"] == 0.5
    # Resumed: the rest of the run, evaluating at 8 and at the end.
    state = train(trainer, state, TrainingConfig(train_iters=10, eval_interval=4, eval_iters=1),
                  checkpoint, writer)  # fmt: skip
    assert state.iteration == 10 and saves == [3, 6, 9, 10] and evaluations == [4, 8, 10]
    # --eval-iters 0: no evaluation at all.
    evaluations.clear()
    train(trainer, TrainState(), TrainingConfig(train_iters=2, eval_iters=0), checkpoint, writer)
    assert evaluations == []
