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
    # A layout with another DP size has another global batch, so another schedule in samples:
    # keep the saved one (--use-checkpoint-opt_param-scheduler), as the run being continued.
    loaded = load_checkpoint(
        f"{root}/ckpt", chunks, optimizer, scheduler, use_checkpoint_scheduler=True
    )
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


# ---------------------------------------------------------------------------------------------
# Re-saving an iteration: no kill between the steps of a publish leaves the tracker naming a
# missing or incomplete checkpoint (single process: the directory moves alone, simulated).
# ---------------------------------------------------------------------------------------------


def _fake_checkpoint(path, content: str) -> None:
    """A directory that counts as a complete checkpoint (metadata.json, written last by
    dist_checkpointing) with a marker telling the copies apart."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    path.mkdir(parents=True)
    (path / "marker").write_text(content)
    save_config(CheckpointingConfig("torch_dist", 1), str(path))


class _Killed(Exception):
    pass


@pytest.mark.parametrize("crash_at", ["rename-old", "rename-new", "remove-old", "none"])
def test_resave_is_atomic_at_every_crash_point(tmp_path, monkeypatch, crash_at):
    root = tmp_path / "ckpt"
    final = checkpoint_dir(root, 5)
    _fake_checkpoint(final, "first")
    (root / checkpointing.TRACKER_FILE).write_text("5\n")
    tmp_dir = final.with_name(final.name + ".tmp")
    _fake_checkpoint(tmp_dir, "second")

    renames = []
    real_rename, real_rmtree = os.rename, checkpointing.shutil.rmtree

    def rename(src, dst):
        renames.append(src)
        if (crash_at, len(renames)) in (("rename-old", 1), ("rename-new", 2)):
            raise _Killed
        real_rename(src, dst)

    def rmtree(path, ignore_errors=False):
        if crash_at == "remove-old" and str(path).endswith(".old"):
            (path / "marker").unlink()  # killed half-way through deleting it
            raise _Killed
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpointing.os, "rename", rename)
    monkeypatch.setattr(checkpointing.shutil, "rmtree", rmtree)
    try:
        checkpointing._publish(tmp_dir, final)
    except _Killed:
        pass
    monkeypatch.undo()
    # The tracker's iteration loads, from a complete copy: the old one or the new one.
    config = checkpointing.CheckpointConfig(load=str(root))
    assert checkpointing.find_checkpoint(config) == 5
    path = checkpointing._existing_checkpoint(root, 5, "tracker")
    assert checkpointing.is_complete(path)
    expected = "first" if crash_at in ("rename-old", "rename-new") else "second"
    assert (path / "marker").read_text() == expected
    # The next save's clean-up puts the only copy back under its own name, drops the rest.
    checkpointing._clean_leftovers(root)
    assert (final / "marker").read_text() == expected
    assert not final.with_name(final.name + ".old").exists()


# ---------------------------------------------------------------------------------------------
# --load that cannot be what was meant, a garbage tracker: errors naming the flag or file.
# ---------------------------------------------------------------------------------------------


def _find(**kwargs):
    return checkpointing.find_checkpoint(checkpointing.CheckpointConfig(**kwargs))


def test_load_path_errors(tmp_path):
    from megatron_sip.errors import ConfigError

    root = tmp_path / "ckpt"
    _fake_checkpoint(checkpoint_dir(root, 3), "x")
    tracker = root / checkpointing.TRACKER_FILE

    # No tracker, but checkpoints: not "start from scratch".
    with pytest.raises(ConfigError, match=f"{tracker}: is missing.*iter_0000003.*--ckpt-step"):
        _find(load=str(root))
    assert _find(load=str(root), ckpt_step=3) == 3
    with pytest.raises(ConfigError, match="--ckpt-step: names iteration 4"):
        _find(load=str(root), ckpt_step=4)

    for garbage in ("three\n", "", "-1", "release"):
        tracker.write_text(garbage)
        with pytest.raises(ConfigError, match=f"^{tracker}: "):
            _find(load=str(root))
    tracker.write_text("7\n")
    with pytest.raises(ConfigError, match=f"{tracker}: names iteration 7.*does not exist"):
        _find(load=str(root))
    tracker.write_text("3\n")
    assert _find(load=str(root)) == 3

    # An iter_* directory: refused with the flags that load it.
    with pytest.raises(ConfigError, match=f"--load {root} --ckpt-step 3"):
        _find(load=str(checkpoint_dir(root, 3)))

    # A --load that does not exist: an error, unless the run saves there (a fresh resumable run).
    typo = tmp_path / "cktp"
    with pytest.raises(ConfigError, match="--load: .*cktp does not exist"):
        _find(load=str(typo), save=str(root))
    assert _find(load=str(typo), save=str(typo)) is None

    # An empty --load: from scratch, unless --exit-on-missing-checkpoint.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _find(load=str(empty)) is None
    with pytest.raises(ConfigError, match="--exit-on-missing-checkpoint: no checkpoint"):
        _find(load=str(empty), exit_on_missing_checkpoint=True)
    assert (
        _find(load=str(empty), exit_on_missing_checkpoint=True, pretrained_checkpoint="b") is None
    )


def test_checkpoint_flags():
    from megatron_sip.arguments import JobConfig, parse_args
    from megatron_sip.errors import ConfigError

    model = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
    model += ["--seq-length", "32", "--vocab-size", "64", "--load", "ckpt", "--save", "ckpt"]
    config = parse_args(
        model + ["--override-opt_param-scheduler", "--no-save-optim", "--no-save-rng"],
        JobConfig,
        world_size=1,
        exit_on_error=False,
    )
    options = checkpointing.resume_options(config.checkpoint)
    assert options["override_scheduler"] and not options["use_checkpoint_scheduler"]
    assert config.checkpoint.no_save_optim and config.checkpoint.no_save_rng
    for flags, message in (
        (["--async-save"], "--async-save: not supported"),
        (
            ["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"],
            "contradict",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_args(model + flags, JobConfig, world_size=1, exit_on_error=False)


def test_changed_schedule_is_an_error_unless_a_flag_says_which_wins():
    """Megatron-Core's OptimizerParamScheduler decides; a difference is named before loading."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_sip.errors import ConfigError

    def scheduler(lr, decay_steps):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        return OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=lr,
            min_lr=0.0,
            lr_warmup_steps=0,
            lr_decay_steps=decay_steps,
            lr_decay_style="cosine",
            start_wd=0.0,
            end_wd=0.0,
            wd_incr_steps=decay_steps,
            wd_incr_style="constant",
        )

    saved_scheduler = scheduler(1e-3, 100)
    saved_scheduler.step(40)
    saved = saved_scheduler.state_dict()
    check = checkpointing._check_schedule
    check(scheduler(1e-3, 100), saved, override=False, use_checkpoint=False, path="c")
    with pytest.raises(ConfigError, match=r"--lr: checkpoint 0.001, flags 0.002.*--train-iters"):
        check(scheduler(2e-3, 200), saved, override=False, use_checkpoint=False, path="c")
    for override, expected_lr in ((True, 2e-3), (False, 1e-3)):
        resumed = scheduler(2e-3, 200)
        check(resumed, saved, override=override, use_checkpoint=not override, path="c")
        resumed.override_opt_param_scheduler = override
        resumed.use_checkpoint_opt_param_scheduler = not override
        resumed.load_state_dict(saved)
        assert resumed.max_lr == expected_lr and resumed.num_steps == 40


@pytest.mark.slow
def test_bad_resume_and_input_exit_2_naming_them(tmp_path):
    """The user story: pretrain, then resume with more iterations and another --lr. Megatron-LM's
    answer, not a silently kept schedule: exit 2 naming both, no traceback. Then a garbage tracker
    and a tokenizer file of the wrong kind, found after parsing, stop the same way."""
    import subprocess
    import sys

    from .pretrain_utils import NULL_TOKENIZER, TINY_ARGS, run_pretrain

    ckpt = str(tmp_path / "ckpt")
    common = ["--mock-data", "--eval-iters", "0", "--save", ckpt, "--load", ckpt]
    run_pretrain(1, *common, "--train-iters", "2")
    assert read_tracker(ckpt) == 2
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK"))}
    result = subprocess.run(
        [sys.executable, "-m", "megatron_sip.pretrain", TINY_ARGS, *NULL_TOKENIZER, *common,
         "--train-iters", "4", "--lr", "1e-3"],
        capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--lr: checkpoint 0.003, flags 0.001" in result.stderr
    # counted in samples: max(--train-iters, --lr-warmup-iters 2 + 1) x global batch 8
    assert "--train-iters: checkpoint 24, flags 32" in result.stderr
    assert "--override-opt_param-scheduler" in result.stderr
    assert "Traceback" not in result.stderr

    # A garbage tracker, and a tokenizer file of the wrong kind: the same, exit 2 naming the file.
    tracker = tmp_path / "ckpt" / "latest_checkpointed_iteration.txt"
    tracker.write_text("half past two\n")
    not_sentencepiece = tmp_path / "tokenizer.json"
    not_sentencepiece.write_text('{"model": {"type": "BPE", "vocab": {}, "merges": []}}')
    for flags, fragment in (
        ([*NULL_TOKENIZER, *common, "--train-iters", "4"], str(tracker)),
        (["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
          str(not_sentencepiece), "--mock-data", "--train-iters", "4"], str(not_sentencepiece)),
    ):  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "megatron_sip.pretrain", TINY_ARGS, *flags],
            capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert result.returncode == 2, result.stderr[-3000:]
        assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr
