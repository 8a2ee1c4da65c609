"""Runs a function on N real processes joined by torch.distributed (gloo), as torchrun would."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(local_rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            del os.environ[name]
    os.environ.update(
        RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    fn(*args)


def run_ranks(fn, world_size: int, *args) -> None:
    """Calls ``fn(*args)`` on ``world_size`` spawned ranks; a failure on any rank raises here."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)
