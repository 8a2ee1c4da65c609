"""Runs a function on N real processes joined by torch.distributed (gloo), as torchrun would."""

from __future__ import annotations

from megatron_sip.initialize import free_port, spawn_local_world

__all__ = ["free_port", "run_ranks"]


def run_ranks(fn, world_size: int, *args) -> None:
    """Calls ``fn(*args)`` on ``world_size`` spawned ranks (one OpenMP thread each); a failure
    on any rank raises here."""
    spawn_local_world(fn, world_size, *args)
