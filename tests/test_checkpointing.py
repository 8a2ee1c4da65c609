"""Distributed checkpoints: resharding across TP/PP, full state round trip, crash safety."""

from __future__ import annotations

import itertools
import os
import signal

import pytest
import torch
from torch.multiprocessing import ProcessExitedException

from megatron_sip.initialize import destroy_distributed
from megatron_sip.models import checkpointing
from megatron_sip.models.checkpointing import (
    checkpoint_dir,
    load_checkpoint,
    read_tracker,
    save_checkpoint,
)
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.lm_loss import lm_forward_step
from megatron_sip.training.step import train_step

from . import workers
from .distributed import run_ranks

SAVED_ITERATION = 2


def _train(chunks, optimizer, scheduler, steps):
    batch = workers.fixed_batch(seed=1)
    for _ in range(steps):
        train_step(
            lm_forward_step,
            itertools.repeat(batch),
            chunks,
            optimizer,
            scheduler,
            num_microbatches=1,
            seq_length=workers.SEQ,
            micro_batch_size=workers.BATCH,
            samples_per_step=workers.BATCH,
        )


def _probe(chunks, optimizer, scheduler):
    """Logits of the current weights, then the loss after one more optimizer step (which depends
    on the restored Adam moments and LR schedule, not only on the weights)."""
    logits, _ = workers.logits_and_loss(chunks, workers.fixed_batch(seed=2), forward_only=True)
    _train(chunks, optimizer, scheduler, 1)
    _, loss_after_step = workers.logits_and_loss(
        chunks, workers.fixed_batch(seed=2), forward_only=True
    )
    return logits, loss_after_step


def _training(distributed_optimizer: bool):
    return TrainingConfig(
        micro_batch_size=workers.BATCH,
        lr=1e-2,
        train_iters=10,
        clip_grad=1.0,
        use_distributed_optimizer=distributed_optimizer,
    )


def save_worker(root: str, tp: int, distributed_optimizer: bool) -> None:
    parallel, context = workers.setup(tp=tp, pp=1)
    chunks, _, optimizer, scheduler = workers.build_with_optimizer(
        parallel, context, _training(distributed_optimizer)
    )
    _train(chunks, optimizer, scheduler, SAVED_ITERATION)
    save_checkpoint(f"{root}/ckpt", SAVED_ITERATION, chunks, optimizer, scheduler)
    # Each rank has its own generators (the model-parallel one differs per TP rank).
    torch.save(workers.draw_rng_sample(), f"{root}/rng_rank{context.rank}.pt")
    logits, loss_after_step = _probe(chunks, optimizer, scheduler)
    if context.rank == 0:
        torch.save(
            {
                "logits": logits,
                "loss_after_step": loss_after_step,
                "scheduler_steps": scheduler.num_steps - workers.BATCH,
            },
            f"{root}/expected.pt",
        )
    destroy_distributed()


def load_worker(root: str, tp: int, pp: int, distributed_optimizer: bool, saved_tp: int) -> None:
    parallel, context = workers.setup(tp=tp, pp=pp, seed=999)  # a different seed: all must load
    chunks, _, optimizer, scheduler = workers.build_with_optimizer(
        parallel, context, _training(distributed_optimizer)
    )
    loaded = load_checkpoint(f"{root}/ckpt", chunks, optimizer, scheduler)
    expected = torch.load(f"{root}/expected.pt")
    assert loaded.iteration == SAVED_ITERATION
    assert loaded.optimizer_restored
    assert scheduler.num_steps == expected["scheduler_steps"]
    same_layout = (tp, pp, context.world_size) == (saved_tp, 1, 2)
    assert loaded.rng_restored == same_layout
    if same_layout:
        sample = workers.draw_rng_sample()
        saved = torch.load(f"{root}/rng_rank{context.rank}.pt")
        for key in saved:
            torch.testing.assert_close(sample[key], saved[key], atol=0, rtol=0, msg=key)
    logits, loss_after_step = _probe(chunks, optimizer, scheduler)
    if logits is not None:
        torch.testing.assert_close(logits, expected["logits"], atol=2e-5, rtol=1e-4)
    if loss_after_step is not None:
        assert loss_after_step == pytest.approx(expected["loss_after_step"], rel=1e-4)
    destroy_distributed()


def _save(tmp_path_factory, name, tp, distributed_optimizer):
    root = tmp_path_factory.mktemp(name)
    run_ranks(save_worker, 2, str(root), tp, distributed_optimizer)
    assert read_tracker(root / "ckpt") == SAVED_ITERATION
    return root


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    return _save(tmp_path_factory, "tp2", tp=2, distributed_optimizer=False)


@pytest.fixture(scope="module")
def dp2_distributed_optimizer_checkpoint(tmp_path_factory):
    return _save(tmp_path_factory, "dp2-distopt", tp=1, distributed_optimizer=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "world,tp,pp", [(2, 1, 2), (1, 1, 1), (2, 2, 1)], ids=["as-pp2", "as-tp1", "as-tp2"]
)
def test_tp2_checkpoint_loads_at_other_layouts(tp2_checkpoint, world, tp, pp):
    run_ranks(load_worker, world, str(tp2_checkpoint), tp, pp, False, 2)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2], ids=["as-dp2", "as-tp2"])
def test_distributed_optimizer_checkpoint_reshards(dp2_distributed_optimizer_checkpoint, tp):
    """ZeRO-1 optimizer state saved over 2 data-parallel ranks loads at DP=2 and at TP=2."""
    run_ranks(load_worker, 2, str(dp2_distributed_optimizer_checkpoint), tp, 1, True, 1)


# ---------------------------------------------------------------------------------------------
# Crash safety: a save killed at any point leaves the previous checkpoint as the latest.
# ---------------------------------------------------------------------------------------------


def _die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def _fill(chunks, value: float) -> None:
    for param in chunks[0].parameters():
        param.data.fill_(value)


def killed_save_worker(root: str, kill_point: str) -> None:
    parallel, context = workers.setup()
    chunks, _ = workers.build(parallel, context)
    _fill(chunks, 1.0)
    save_checkpoint(root, 1, chunks)
    _fill(chunks, 2.0)
    if kill_point == "mid-write":  # common.pt written, tensor shards not yet
        from megatron.core.dist_checkpointing.strategies.torch import (
            TorchDistSaveShardedStrategy,
        )

        TorchDistSaveShardedStrategy.async_save = _die
    elif kill_point == "before-rename":
        checkpointing._publish = _die
    elif kill_point == "before-tracker":
        checkpointing._update_tracker = _die
    save_checkpoint(root, 2, chunks)
    raise AssertionError("the save should have been killed")


def resume_after_kill_worker(root: str) -> None:
    parallel, context = workers.setup()
    chunks, _ = workers.build(parallel, context)
    _fill(chunks, 0.0)
    loaded = load_checkpoint(root, chunks)
    assert loaded.iteration == 1
    assert all(torch.all(p == 1.0) for p in chunks[0].parameters())
    # The next save goes through despite what the killed one left behind.
    _fill(chunks, 3.0)
    save_checkpoint(root, 2, chunks)
    _fill(chunks, 0.0)
    assert load_checkpoint(root, chunks).iteration == 2
    assert all(torch.all(p == 3.0) for p in chunks[0].parameters())
    destroy_distributed()


@pytest.mark.parametrize("kill_point", ["mid-write", "before-rename", "before-tracker"])
def test_killed_save_keeps_previous_checkpoint(tmp_path, kill_point):
    root = tmp_path / "ckpt"
    with pytest.raises(ProcessExitedException) as killed:
        run_ranks(killed_save_worker, 1, str(root), kill_point)
    assert killed.value.exit_code == -signal.SIGKILL
    assert read_tracker(root) == 1
    leftover = {
        "mid-write": checkpoint_dir(root, 2).with_name("iter_0000002.tmp"),
        "before-rename": checkpoint_dir(root, 2).with_name("iter_0000002.tmp"),
        "before-tracker": checkpoint_dir(root, 2),
    }[kill_point]
    assert leftover.exists(), "the kill should have happened mid-save"
    run_ranks(resume_after_kill_worker, 1, str(root))
    assert read_tracker(root) == 2
    assert not checkpoint_dir(root, 2).with_name("iter_0000002.tmp").exists()
