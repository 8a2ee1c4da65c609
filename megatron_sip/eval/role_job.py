"""What the role measurement tools (``eval.judge_agreement``, ``eval.rewriter_quality``) share:
ranks for a colocated role, refused device flags for a role that has none, the printed report."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from megatron_sip.arguments import LaunchConfig, reject_set_flags
from megatron_sip.initialize import destroy_distributed, initialize_distributed
from megatron_sip.roles.config import RoleContext


def reject_device_flags(configs: LaunchConfig, roles: str) -> None:
    """Refuses the parallel and platform flags of a run whose roles are not colocated."""
    reason = f"only a colocated (megatron) {roles} runs on a device and ranks"
    reject_set_flags(configs.parallel, None, reason)
    reject_set_flags(configs.platform, None, reason)


@contextlib.contextmanager
def role_ranks(
    configs: LaunchConfig, colocated: bool, seed: int
) -> Iterator[tuple[int, RoleContext]]:
    """(rank, RoleContext) of this process: with a colocated role, one process per rank under
    torchrun (a role may be model-parallel), the process group torn down after; else rank 0."""
    if not colocated:
        yield 0, RoleContext()
        return
    context = initialize_distributed(configs.parallel, configs.platform.device, seed)
    yield context.rank, RoleContext(configs.parallel, context.pg_collection)
    destroy_distributed()


def print_report(report: dict, rank: int, output: Optional[str]) -> None:
    """Rank 0 prints the report as one JSON line, and writes it to ``output`` when given."""
    if rank != 0:
        return
    text = json.dumps(report, sort_keys=True)
    if output:
        Path(output).write_text(text + "\n")
    print(text)
