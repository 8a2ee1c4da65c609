"""The world from torchrun's environment and from SLURM's is the same world."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sip.initialize import expand_hostlist, first_host, launch_env

from .distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
CHECK_WORLD = str(ROOT / "tools" / "check_world.py")
LAYOUT = ["--device", "cpu", "--tensor-model-parallel-size", "2"]


@pytest.mark.parametrize(
    "nodelist,host",
    [
        ("localhost", "localhost"),
        ("gpu[003-005,9]", "gpu003"),
        ("node7,node8", "node7"),
        ("a100-[12-13],b1", "a100-12"),
        ("node-[01-04]-ib", "node-01-ib"),  # SLURM 22.05's scontrol rejects it: the parser
        ("rack1-[3,5-7].cluster", "rack1-3.cluster"),
    ],
)
def test_first_host_of_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize(
    "hostlist,hosts",
    [
        ("node-[01-04]-ib", ["node-01-ib", "node-02-ib", "node-03-ib", "node-04-ib"]),
        ("rack1-[3,5-7].cluster", [f"rack1-{i}.cluster" for i in (3, 5, 6, 7)]),
        ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),  # first group slowest, as SLURM
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),  # padding of the low bound
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("gpu[003-005,9],cpu1", ["gpu003", "gpu004", "gpu005", "gpu9", "cpu1"]),
        ("x[1-2]-y,z[07],plain", ["x1-y", "x2-y", "z07", "plain"]),
    ],
)
def test_expand_hostlist_as_slurm_does(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts
    if shutil.which("scontrol"):
        # Where the installed SLURM accepts the form (before 23.02 it rejects a suffix after a
        # bracket), it lists the same hosts.
        listed = subprocess.run(["scontrol", "show", "hostnames", hostlist],
                                capture_output=True, text=True, timeout=30)  # fmt: skip
        if listed.returncode == 0 and listed.stdout.strip():  # it rejects with exit 0
            assert listed.stdout.split() == hosts


@pytest.mark.parametrize("hostlist", ["n[1-", "n[3-1]", "n[a-b]", "n]1[", ""])
def test_bad_hostlist_is_refused_with_its_text(hostlist):
    with pytest.raises(ValueError, match="SLURM hostlist"):
        expand_hostlist(hostlist)


def test_launch_env_precedence():
    slurm = {
        "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[010-011]", "SLURM_JOB_ID": "4242",
    }  # fmt: skip
    env = launch_env(slurm)
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("slurm", 3, 8, 1)
    assert (env.master_addr, env.master_port) == ("gpu010", 20000 + 4242)
    # srun + torchrun: torchrun's variables describe the process.
    both = {**slurm, "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "MASTER_ADDR": "h",
            "MASTER_PORT": "1234"}  # fmt: skip
    env = launch_env(both)
    assert (env.launcher, env.rank, env.world_size, env.master_port) == ("torchrun", 5, 16, 1234)
    assert launch_env({}).world_size == 1


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _worlds(outputs: list[str]) -> dict[int, dict]:
    worlds = {}
    for output in outputs:
        for line in output.splitlines():
            if line.startswith("{"):
                world = json.loads(line)
                worlds[world["rank"]] = world
    return worlds


def _comparable(world: dict) -> dict:
    return {k: v for k, v in world.items() if k not in ("launcher", "master")}


def _free_port_in_slurm_range() -> int:
    """A free port that ``20000 + SLURM_JOB_ID % 40000`` can name (the OS may hand out 60000+)."""
    for _ in range(1000):
        port = free_port()
        if 20000 <= port < 60000:
            return port
    raise RuntimeError("no free port in [20000, 60000) after 1000 tries")


@pytest.mark.slow
def test_slurm_env_initialises_the_same_world_as_torchrun():
    port = free_port()
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port), CHECK_WORLD, *LAYOUT],
        env=_clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert torchrun.returncode == 0, torchrun.stderr

    # srun with one task per rank: only SLURM's variables; the port comes from the job id.
    job_id = _free_port_in_slurm_range() - 20000
    ranks = []
    for rank in range(2):
        env = _clean_env()
        env.update(
            SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
            SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(job_id),
        )  # fmt: skip
        ranks.append(
            subprocess.Popen(
                [sys.executable, CHECK_WORLD, *LAYOUT],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    slurm_outputs = []
    for process in ranks:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        slurm_outputs.append(stdout)

    from_torchrun, from_slurm = _worlds([torchrun.stdout]), _worlds(slurm_outputs)
    assert sorted(from_torchrun) == sorted(from_slurm) == [0, 1]
    for rank in (0, 1):
        assert from_torchrun[rank]["launcher"] == "torchrun"
        assert from_slurm[rank]["launcher"] == "slurm"
        assert from_slurm[rank]["master"] == f"localhost:{job_id + 20000}"
        assert _comparable(from_slurm[rank]) == _comparable(from_torchrun[rank])
        assert from_slurm[rank]["tp_rank"] == rank and from_slurm[rank]["tp_size"] == 2
        assert from_slurm[rank]["all_reduce_rank_sum"] == 1.0  # 0 + 1: the group works
