"""Stopping a run cleanly: exit signals, the time budget, and the checkpoint writer's helpers.

``--exit-signal-handler`` and ``--exit-duration-in-mins`` work as in Megatron-LM: a rank that was
signalled (or whose clock ran out) only raises a flag; at the next iteration boundary every rank
all-reduces the flags (as Megatron-LM's ``DistributedSignalHandler`` does), so all of them save the
same iteration and return together. The entry point then exits 0, and a batch script can tell a
stopped run from a finished one by the checkpoint's iteration (``examples/slurm``).

Megatron-Core's ``torch_dist`` save strategy collects its writer results through a
``multiprocessing`` manager: a spawned server process (a fresh interpreter that re-imports the
entry point, some 300-400 MB) that lives for the rest of the run, and a resource tracker beside
it. Nothing stops that server when the trainer dies of a signal, so it would outlive every killed
or preempted job. :func:`install_checkpoint_writer_queue` starts that manager itself, with the
kernel told to kill the server when the trainer dies (``PR_SET_PDEATHSIG``); the resource tracker
exits on its own once no live process holds its pipe.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.managers import SyncManager
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# The signal `sbatch --signal=USR1@SECS` (or `scancel --signal=USR1`) sends ahead of a time limit.
PREEMPTION_SIGNAL = signal.SIGUSR1


class ExitSignalHandler:
    """Records the exit signals; :meth:`received` agrees on them over all ranks (collective).

    A context manager: the previous handlers come back on exit."""

    def __init__(self, exit_signal: str = "SIGTERM"):
        self.signals = sorted({signal.Signals[exit_signal], PREEMPTION_SIGNAL})
        self.caught: Optional[signal.Signals] = None
        self._previous: dict = {}

    def __enter__(self) -> ExitSignalHandler:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        # Only a flag: saving from inside a handler could interrupt a collective half-way.
        self.caught = signal.Signals(signum)

    def received(self) -> bool:
        """True on every rank when any rank caught an exit signal (collective)."""
        return any_rank(self.caught is not None)


def any_rank(flag: bool) -> bool:
    """``flag`` OR-ed over all ranks of the world (collective; local without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class ExitTimer:
    """``--exit-duration-in-mins``: :meth:`expired` agrees over all ranks (collective)."""

    def __init__(self, minutes: Optional[float]):
        self.minutes = minutes
        self.start = time.monotonic()

    @property
    def elapsed_minutes(self) -> float:
        return (time.monotonic() - self.start) / 60.0

    def expired(self) -> bool:
        if not self.minutes:
            return False
        return any_rank(self.elapsed_minutes > self.minutes)


def all_finite(values) -> bool:
    """True when no value (floats, or None for "not measured") is NaN or Inf."""
    return all(value is None or math.isfinite(value) for value in values)


# ---- Megatron-Core's checkpoint writer helpers ------------------------------------------------

_PR_SET_PDEATHSIG = 1
_writer_manager = None


def _die_with_parent(parent: int) -> None:
    """Initializer of the manager's server process: the kernel kills it when its parent (the
    trainer) dies, whatever kills the trainer (SIGKILL included)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the trainer died before the request took effect
        os._exit(0)
    # A Ctrl-C meant for the trainer must not kill its helper mid-save.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def install_checkpoint_writer_queue() -> None:
    """Gives Megatron-Core's ``FileSystemWriterAsync`` its results queue from a manager whose
    server dies with this process (once per process; a no-op after the first call).

    Megatron-Core creates the same manager lazily (``filesystem_async._get_write_results_queue``,
    spawn context) but starts it without an initializer; pre-filling its cache is the one
    difference. The manager is shut down at interpreter exit (``multiprocessing``'s finalizer)."""
    global _writer_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _writer_manager is not None or filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()
    _writer_manager = manager
