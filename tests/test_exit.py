"""Bad numerics skip the step in a real Megatron step; a killed or signalled trainer leaves no
process behind (Megatron-Core's checkpoint writer helpers die with it)."""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from megatron_sip.initialize import destroy_distributed
from megatron_sip.training.lm_loss import lm_forward_step
from megatron_sip.training.step import train_step

from . import workers
from .distributed import free_port, run_ranks

ROOT = Path(__file__).resolve().parents[1]


def _poisoned_forward_step(poison: str):
    """lm_forward_step with a NaN loss ("loss") or a finite loss whose gradient is NaN ("grad")."""

    def forward_step(data_iterator, model):
        output, loss_func = lm_forward_step(data_iterator, model)
        if poison == "loss":
            output = output * math.nan
        elif poison == "grad":
            output.register_hook(lambda grad: grad * math.nan)
        return output, loss_func

    return forward_step


def nonfinite_step_worker() -> None:
    parallel, context = workers.setup()
    chunks, _, optimizer, scheduler = workers.build_with_optimizer(parallel, context)
    batch = itertools.repeat(workers.fixed_batch(seed=1))

    def step(poison=None):
        return train_step(
            _poisoned_forward_step(poison), batch, chunks, optimizer, scheduler,
            num_microbatches=1, seq_length=workers.SEQ, micro_batch_size=workers.BATCH,
            samples_per_step=workers.BATCH,
        )  # fmt: skip

    assert step().update_successful
    for poison in ("loss", "grad"):
        weights = {name: p.detach().clone() for name, p in chunks[0].named_parameters()}
        steps_done, lr = scheduler.num_steps, optimizer.param_groups[0]["lr"]
        result = step(poison)
        assert not result.update_successful and not math.isfinite(result.grad_norm), poison
        assert math.isfinite(result.losses["lm loss"]) == (poison == "grad")
        for name, param in chunks[0].named_parameters():
            assert torch.equal(param, weights[name]), (poison, name)
        assert (scheduler.num_steps, optimizer.param_groups[0]["lr"]) == (steps_done, lr)
    # A good step afterwards updates again (no NaN left in the optimizer state).
    result = step()
    assert result.update_successful and math.isfinite(result.grad_norm)
    assert all(torch.isfinite(p).all() for p in chunks[0].parameters())
    destroy_distributed()


def test_nonfinite_loss_or_gradient_skips_the_update():
    run_ranks(nonfinite_step_worker, 1)


# A trainer that saved once, then waits to be killed (its own process, as under srun).
SAVED_THEN_WAIT = """
import sys, time
from tests import workers
from megatron_sip.models.checkpointing import save_checkpoint
parallel, context = workers.setup()
chunks, _ = workers.build(parallel, context)
save_checkpoint(sys.argv[1], 1, chunks)
print("saved", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_trainer_leaves_no_process_behind(tmp_path, signum):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
    }  # fmt: skip
    trainer = subprocess.Popen(
        [sys.executable, "-c", SAVED_THEN_WAIT, str(tmp_path / "ckpt")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert trainer.stdout.readline().strip() == "saved"
        helpers = psutil.Process(trainer.pid).children(recursive=True)
        assert helpers, "the save should have started Megatron-Core's writer helpers"
        trainer.send_signal(signum)
        assert trainer.wait(timeout=30) == -signum
        _, alive = psutil.wait_procs(helpers, timeout=15)
        assert not alive, [(p.pid, p.cmdline()[:3]) for p in alive]
    finally:
        trainer.kill()
        trainer.wait()
