"""Rank-aware logging: rank 0 speaks, other ranks only warn."""

from __future__ import annotations

import logging
import sys
import warnings

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def print_rank_0(message: str) -> None:
    if rank() == 0:
        print(message, flush=True)


def setup_logging(level: int = logging.INFO) -> None:
    """INFO on rank 0, WARNING elsewhere; hides torch's deprecation notices about the checkpoint
    APIs that Megatron-Core 0.16 calls (nothing a user can act on)."""
    for message in (r".*load_state_dict. is deprecated.*", r".*Please use DTensor instead.*"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    # Megatron-Core logs its internals (bucket layouts, scheduler values) at INFO.
    for name in ("megatron", "megatron.core.rerun_state_machine"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.basicConfig(
        level=level if rank() == 0 else logging.WARNING,
        format="[%(asctime)s rank%(rank)s %(name)s] %(message)s",
        stream=sys.stdout,
        force=True,
    )
    record_factory = logging.getLogRecordFactory()

    def with_rank(*args, **kwargs):
        record = record_factory(*args, **kwargs)
        record.rank = rank()
        return record

    logging.setLogRecordFactory(with_rank)
