"""Submit batch jobs to a SLURM cluster and wait for them (tests of the sbatch scripts).

Accounting is off on the local cluster (`.ci/slurm.sh`), so results come from
``scontrol show job -o`` rather than ``sacct``; finished jobs stay visible there for
``MinJobAge`` (600 s in the local config).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLURM_SH = ROOT / ".ci" / "slurm.sh"

# Node states in which the node takes jobs (sinfo's short names; a trailing * = not responding).
USABLE_NODE_STATES = ("idle", "mix", "alloc", "comp")
# Job states after which a job never runs again (a requeued job goes back to PENDING instead).
FINAL_JOB_STATES = frozenset(
    {
        "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
        "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    }
)  # fmt: skip


def node_states(timeout: float = 5.0) -> list[str]:
    """Short states (``idle``, ``mix``, ``down*``...) of the cluster's nodes; [] without SLURM.

    With SLURM installed but its controller down, ``sinfo`` retries for ~9 s: ``timeout`` cuts
    that short (a live controller answers in well under a second)."""
    if shutil.which("sinfo") is None:
        return []
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%t"],
            capture_output=True, text=True, timeout=timeout, env=submit_env(),
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return out.stdout.split()


def cluster_ready() -> bool:
    """True when ``sinfo`` answers and at least one node takes jobs."""
    return any(state in USABLE_NODE_STATES for state in node_states())


def submit_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The submitting environment: this process's, without the ``SLURM_*`` variables of any job
    we may run inside (they would leak into the new job), plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    base.update(env or {})
    return base


def submit(
    script_path: str | os.PathLike,
    env: Mapping[str, str] | None = None,
    workdir: str | os.PathLike | None = None,
    sbatch_args: Sequence[str] = (),
) -> str:
    """``sbatch`` a script and return its job id.

    ``env`` is added to the submitting environment, which the job inherits (``--export=ALL``);
    ``workdir`` becomes the job's working directory and ``SLURM_SUBMIT_DIR`` (default: the
    current directory); ``sbatch_args`` go before the script (they override its ``#SBATCH``
    lines, e.g. ``["--output", path]``).
    """
    workdir = Path(workdir) if workdir is not None else Path.cwd()
    cmd = ["sbatch", "--parsable", "--export=ALL", f"--chdir={workdir}", *sbatch_args]
    cmd.append(str(script_path))
    out = subprocess.run(
        cmd, cwd=workdir, env=submit_env(env), capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    # --parsable prints "jobid" or "jobid;cluster".
    return out.stdout.strip().split(";")[0]


_FIELD_START = re.compile(r"\s+(?=[A-Za-z][A-Za-z0-9_:/.()-]*=)")


def parse_scontrol(line: str) -> dict[str, str]:
    """``Key=Value Key=Value ...`` from ``scontrol show ... -o`` as a dict.

    Values may contain ``=`` (``TRES=cpu=2,node=1``) or spaces (``Reason=...``); a new field
    starts at whitespace followed by ``Name=``.
    """
    fields = {}
    for part in _FIELD_START.split(line.strip()):
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = value
    return fields


def job_info(job_id: str) -> dict[str, str] | None:
    """The job's fields from ``scontrol show job -o``; None once SLURM has forgotten the job."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)],
        capture_output=True, text=True, timeout=30, env=submit_env(),
    )  # fmt: skip
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return parse_scontrol(out.stdout.splitlines()[0])


def wait_for_job(job_id: str, timeout: float = 120.0, poll: float = 0.5) -> dict[str, str]:
    """Wait until the job reaches a final state and return its ``scontrol`` fields
    (``JobState``, ``ExitCode``, ``StdOut``, ``NodeList``, ...).

    On timeout the job is cancelled and TimeoutError raised with its last state.
    """
    deadline = time.monotonic() + timeout
    while True:
        fields = job_info(job_id)
        if fields is None:
            raise RuntimeError(
                f"job {job_id}: unknown to scontrol (never submitted, or finished longer ago "
                "than the cluster's MinJobAge)"
            )
        if fields.get("JobState") in FINAL_JOB_STATES:
            return fields
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)
            raise TimeoutError(
                f"job {job_id} still {fields.get('JobState')} after {timeout:.0f}s "
                f"(reason {fields.get('Reason')}); cancelled it"
            )
        time.sleep(poll)


def job_output(fields: Mapping[str, str]) -> str:
    """The text of the job's stdout file (``StdOut`` of ``wait_for_job``'s result)."""
    return Path(fields["StdOut"]).read_text()
