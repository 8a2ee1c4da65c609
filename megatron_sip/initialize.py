"""torch.distributed and Megatron-Core's parallel state, from torchrun's or SLURM's environment.

Under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) those
variables are used. Under ``srun`` with one task per rank and no torchrun, the world comes from
``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``; the master is the first host of
``SLURM_JOB_NODELIST`` and the port ``MASTER_PORT`` or one derived from ``SLURM_JOB_ID``. With
neither, the process is a world of one.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import random
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.rerun_state_machine import (
    destroy_rerun_state_machine,
    initialize_rerun_state_machine,
)
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_sip import platform
from megatron_sip.errors import ConfigError, require_positive


@dataclasses.dataclass
class ParallelConfig:
    """How ranks are split into tensor-, pipeline-, context- and data-parallel groups."""

    tensor_model_parallel_size: int = 1
    """Ranks that split each layer's weights (TP)."""

    pipeline_model_parallel_size: int = 1
    """Ranks that split the layers into consecutive stages (PP)."""

    context_parallel_size: int = 1
    """Ranks that split each sequence (CP). Only 1 is supported: SIP scores candidates packed
    behind a shared prefix with an arbitrary attention mask, which Megatron-Core's
    context-parallel attention (Transformer Engine's ring attention, causal masks only) cannot
    take, and no entry point splits its batches per CP rank."""

    sequence_parallel: bool = False
    """Split activations outside attention and MLP along the sequence over the TP ranks."""

    distributed_timeout_minutes: int = 10
    """Timeout of collective operations."""

    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Layers per virtual pipeline stage (Megatron-LM's interleaved 1F1B schedule). Refused: the
    interleaved schedule is not implemented here."""

    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline rank (interleaved schedule). Refused, as above."""

    num_virtual_stages_per_pipeline_rank: Optional[int] = None
    """Virtual stages per pipeline rank (interleaved schedule). Refused, as above."""

    def __post_init__(self):
        for flag, value in (
            ("--num-layers-per-virtual-pipeline-stage", self.num_layers_per_virtual_pipeline_stage),
            ("--virtual-pipeline-model-parallel-size", self.virtual_pipeline_model_parallel_size),
            ("--num-virtual-stages-per-pipeline-rank", self.num_virtual_stages_per_pipeline_rank),
        ):
            if value is not None:
                raise ConfigError(
                    flag,
                    "interleaved pipeline schedule not implemented in megatron-sip: every "
                    "pipeline rank holds one model chunk (training, checkpoints, inference and "
                    "SIP scoring assume it); drop the flag and use "
                    "--pipeline-model-parallel-size alone",
                )
        require_positive("--tensor-model-parallel-size", self.tensor_model_parallel_size)
        require_positive("--pipeline-model-parallel-size", self.pipeline_model_parallel_size)
        require_positive("--context-parallel-size", self.context_parallel_size)
        if self.context_parallel_size != 1:
            raise ConfigError(
                "--context-parallel-size",
                f"{self.context_parallel_size} is not supported: batches are not split per "
                "context-parallel rank, and SIP's shared-prefix scoring needs arbitrary attention "
                "masks that context-parallel attention cannot take; use tensor and pipeline "
                "parallelism (--tensor-model-parallel-size, --pipeline-model-parallel-size)",
            )

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def data_parallel_size(self, world_size: int) -> int:
        """DP = world / (TP x PP x CP); the world must divide evenly."""
        if world_size % self.model_parallel_size:
            raise ConfigError(
                "--tensor-model-parallel-size",
                f"world size {world_size} is not divisible by TP x PP x CP = "
                f"{self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size} x "
                f"{self.context_parallel_size}; launch a multiple of {self.model_parallel_size} "
                "ranks or change the parallel sizes",
            )
        return world_size // self.model_parallel_size


# --------------------------------------------------------------------------------------------
# Launcher environment
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Who this process is in the job, as its launcher described it."""

    launcher: str  # "torchrun", "slurm" or "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: ``node-[01-04]-ib,cpu1`` -> ``node-01-ib``."""
    return slurm_hostnames(nodelist)[0]


def slurm_hostnames(hostlist: str) -> list[str]:
    """The hosts of a SLURM hostlist, as ``scontrol show hostnames`` lists them (asked when it
    is installed and accepts the list; SLURM before 23.02 rejects a suffix after a bracket, e.g.
    ``node-[01-04]-ib``), else as :func:`expand_hostlist` reads it."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", hostlist],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    return expand_hostlist(hostlist)


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM hostlist syntax: comma-separated host expressions, each with any number of bracket
    groups of numbers and ranges (zero padding kept), e.g. ``rack1-[3,5-7].cluster`` ->
    ``rack1-3.cluster rack1-5.cluster rack1-6.cluster rack1-7.cluster`` and ``a[1-2]b[3-4]`` ->
    ``a1b3 a1b4 a2b3 a2b4``."""
    hosts = []
    for expression in _split_outside_brackets(hostlist.strip(), hostlist):
        hosts.extend(_expand_expression(expression, hostlist))
    if not hosts:
        raise ValueError(f"no host in the SLURM hostlist {hostlist!r}")
    return hosts


def _split_outside_brackets(text: str, hostlist: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets in the SLURM hostlist {hostlist!r}")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise ValueError(f"unbalanced brackets in the SLURM hostlist {hostlist!r}")
    return [part for part in parts + [current] if part]


def _expand_expression(expression: str, hostlist: str) -> list[str]:
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", expression)
    if match is None:
        if "[" in expression or "]" in expression:
            raise ValueError(f"unbalanced brackets in the SLURM hostlist {hostlist!r}")
        return [expression]
    prefix, ranges, rest = match.groups()
    # The first bracket group varies slowest, as in SLURM's listing.
    tails = _expand_expression(rest, hostlist) if rest else [""]
    return [prefix + number + tail for number in _numbers(ranges, hostlist) for tail in tails]


def _numbers(ranges: str, hostlist: str) -> list[str]:
    numbers = []
    for item in ranges.split(","):
        low, dash, high = item.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"bad range {item!r} in the SLURM hostlist {hostlist!r}")
        if not dash:
            numbers.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {item!r} in the SLURM hostlist {hostlist!r}")
        numbers.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return numbers


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (a local world's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Reads the world from torchrun's variables, else SLURM's, else a world of one."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            launcher="torchrun",
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "MASTER_ADDR" in env:
            master_addr = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env or "SLURM_NODELIST" in env:
            master_addr = first_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
        else:
            raise RuntimeError("SLURM launch without SLURM_JOB_NODELIST or MASTER_ADDR")
        if "MASTER_PORT" in env:
            master_port = int(env["MASTER_PORT"])
        else:
            # Every task of the job derives the same port from the job id.
            master_port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 40000
        return LaunchEnv(
            launcher="slurm",
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=master_addr,
            master_port=master_port,
        )
    return LaunchEnv("single", 0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port())


def world_size_from_env() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return launch_env().world_size


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DistributedContext:
    """The initialised world: launcher info, device and Megatron's process groups."""

    launch: LaunchEnv
    device: str
    pg_collection: ProcessGroupCollection
    tensor_parallel_rank: int
    pipeline_parallel_rank: int
    data_parallel_rank: int
    data_parallel_size: int

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    def announce(self) -> None:
        """Every rank says who it is: the first thing to read when a launch misbehaves."""
        print(
            f"rank {self.rank}/{self.world_size} ({self.launch.launcher} launch, "
            f"{socket.gethostname()}): TP rank {self.tensor_parallel_rank} PP rank "
            f"{self.pipeline_parallel_rank} DP rank {self.data_parallel_rank}",
            flush=True,
        )

    def describe(self) -> dict:
        return {
            "launcher": self.launch.launcher,
            "rank": self.rank,
            "world_size": self.world_size,
            "local_rank": self.launch.local_rank,
            "master": f"{self.launch.master_addr}:{self.launch.master_port}",
            "device": self.device,
            "backend": dist.get_backend(),
            "tp_rank": self.tensor_parallel_rank,
            "tp_size": self.pg_collection.tp.size(),
            "pp_rank": self.pipeline_parallel_rank,
            "pp_size": self.pg_collection.pp.size(),
            "cp_size": self.pg_collection.cp.size(),
            "dp_rank": self.data_parallel_rank,
            "dp_size": self.data_parallel_size,
        }


def set_random_seed(seed: int, pipeline_rank: int) -> None:
    """Megatron-LM's seeding: offset by pipeline stage, TP ranks share the model-parallel seed
    through Megatron's RNG tracker."""
    seed = seed + 100 * pipeline_rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def initialize_distributed(
    parallel: ParallelConfig,
    device: str = "auto",
    seed: int = 1234,
    environ: Optional[Mapping[str, str]] = None,
) -> DistributedContext:
    """Activates the platform, joins the process group and builds Megatron's parallel state."""
    device = platform.activate(device)
    launch = launch_env(environ)
    dp_size = parallel.data_parallel_size(launch.world_size)
    if device == "cuda":
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=platform.distributed_backend(),
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
    )
    # From here on the groups travel explicitly: every model, schedule and trainer gets them.
    groups = ProcessGroupCollection.use_mpu_process_groups()
    set_random_seed(seed, groups.pp.rank())
    # As Megatron-LM: the schedules consult it; result re-runs stay off.
    initialize_rerun_state_machine()
    return DistributedContext(
        launch=launch,
        device=device,
        pg_collection=groups,
        tensor_parallel_rank=groups.tp.rank(),
        pipeline_parallel_rank=groups.pp.rank(),
        data_parallel_rank=groups.dp.rank(),
        data_parallel_size=dp_size,
    )


def destroy_distributed() -> None:
    """Tears down Megatron's parallel state and the process group (safe to call twice)."""
    destroy_rerun_state_machine()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _spawned_rank(local_rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    # A SLURM allocation's variables describe the job's world, not this one.
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


def spawn_local_world(fn, world_size: int, *args) -> None:
    """Calls ``fn(*args)`` on ``world_size`` new local processes with the environment torchrun
    gives its ranks (127.0.0.1, a free port, one OpenMP thread each): for tools that start their
    own world, such as checkpoint conversion. A failure on any rank raises here
    (``torch.multiprocessing.ProcessRaisedException`` / ``ProcessExitedException``)."""
    import torch.multiprocessing as mp

    mp.spawn(_spawned_rank, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)
