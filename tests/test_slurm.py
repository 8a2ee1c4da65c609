"""A real SLURM cluster runs a batch job with two srun tasks.

The ``slurm_cluster`` fixture uses a running cluster when ``sinfo`` shows a node that takes jobs;
otherwise, in CI (``CI`` set) or with ``SIP_SLURM_START=1``, it installs and starts the one-node
localhost cluster of ``.ci/slurm.sh`` (as root) and stops it afterwards; otherwise the tests are
skipped. Job scripts and outputs go to pytest's ``tmp_path``: on a multi-node cluster, point
``--basetemp`` at a filesystem the compute nodes share.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from .slurm_utils import SLURM_SH, cluster_ready, job_info, job_output, submit, wait_for_job

pytestmark = pytest.mark.slow


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _slurm_sh(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SLURM_SH), command], capture_output=True, text=True, timeout=600
    )


def _tail(proc: subprocess.CompletedProcess, lines: int = 15) -> str:
    return "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-lines:])


@pytest.fixture(scope="module")
def slurm_cluster():
    """A SLURM cluster that takes jobs (see the module docstring)."""
    if cluster_ready():
        yield
        return
    if not (_in_ci() or os.environ.get("SIP_SLURM_START") == "1"):
        pytest.skip(
            "SLURM not running; start it with `.ci/slurm.sh start` (after `.ci/slurm.sh "
            "install`, as root), or set SIP_SLURM_START=1 to let the tests do it"
        )
    install = _slurm_sh("install")
    if install.returncode != 0:
        message = f"`.ci/slurm.sh install` failed (exit {install.returncode}):\n{_tail(install)}"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    start = _slurm_sh("start")
    if start.returncode != 0:
        _slurm_sh("stop")
        pytest.fail(f"`.ci/slurm.sh start` failed (exit {start.returncode}):\n{_tail(start)}")
    try:
        yield
    finally:
        _slurm_sh("stop")


TWO_TASKS = """#!/bin/bash
#SBATCH --job-name=sip-slurm-smoke
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:02:00
#SBATCH --output=%x-%j.out
set -euo pipefail
echo "batch on $(hostname) in $PWD"
srun --ntasks=2 --cpus-per-task=1 bash -c \\
    'echo "task $SLURM_PROCID of $SLURM_NTASKS on $SLURMD_NODENAME: $SIP_SMOKE_GREETING"'
"""


def test_cluster_runs_a_two_task_job(slurm_cluster, tmp_path):
    script = tmp_path / "two_tasks.sbatch"
    script.write_text(TWO_TASKS)
    job_id = submit(script, env={"SIP_SMOKE_GREETING": "hello"}, workdir=tmp_path)
    fields = wait_for_job(job_id, timeout=120)
    output = job_output(fields)
    assert fields["JobState"] == "COMPLETED", (fields, output)
    assert fields["ExitCode"] == "0:0", (fields, output)
    assert fields["NumTasks"] == "2"
    assert fields["StdOut"] == str(tmp_path / f"sip-slurm-smoke-{job_id}.out")
    tasks = sorted(line for line in output.splitlines() if line.startswith("task "))
    node = fields["NodeList"]
    assert tasks == [f"task {rank} of 2 on {node}: hello" for rank in range(2)], output


def test_pretrain_tiny_cpu_sbatch(slurm_cluster, tmp_path):
    """examples/slurm/pretrain_tiny_cpu.sbatch: two srun ranks pretrain and checkpoint."""
    from megatron_sip.models.checkpointing import read_tracker

    from .pretrain_utils import ROOT, preprocess, write_counting_corpus

    write_counting_corpus(tmp_path / "corpus.jsonl")
    data_path = preprocess(tmp_path / "corpus.jsonl", tmp_path / "corpus")
    ckpt, tensorboard = tmp_path / "ckpt", tmp_path / "tb"
    job_id = submit(
        ROOT / "examples" / "slurm" / "pretrain_tiny_cpu.sbatch",
        env={
            "REPO": str(ROOT),
            "PYTHON": sys.executable,
            "DATA_PATH": data_path,
            "CKPT_DIR": str(ckpt),
            "TB_DIR": str(tensorboard),
            "TRAIN_ITERS": "10",
        },
        workdir=tmp_path,
    )
    fields = wait_for_job(job_id, timeout=300)
    output = job_output(fields)
    assert fields["JobState"] == "COMPLETED", output[-4000:]
    for rank in (0, 1):
        assert f"rank {rank}/2 (slurm launch" in output, output[-4000:]
    assert "TP=2 PP=1 DP=1" in output
    assert "iteration     10/10" in output
    assert "validation at iteration 10" in output
    assert read_tracker(ckpt) == 10
    assert any(tensorboard.iterdir())


def test_sip_tiny_cpu_sbatch(slurm_cluster, tmp_path):
    """examples/slurm/sip_tiny_cpu.sbatch: two srun ranks (TP=2) run SIP steps with the oracle
    roles and checkpoint (resuming is tested in test_sip_trainer.py)."""
    from megatron_sip.models.checkpointing import read_tracker

    from .judge_utils import build_demo_and_tokenizer
    from .pretrain_utils import ROOT

    demo, tokenizer = build_demo_and_tokenizer(tmp_path)
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input",
         str(demo / "corpus.jsonl"), "--output-prefix", str(tmp_path / "corpus"),
         "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
         tokenizer.tokenizer_model, "--append-eod", "--workers", "1"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    env = {
        "REPO": str(ROOT),
        "PYTHON": sys.executable,
        "DEMO_DIR": str(demo),
        "DATA_PATH": str(tmp_path / "corpus_text_document"),
        "TOKENIZER_MODEL": tokenizer.tokenizer_model,
        "CKPT_DIR": str(tmp_path / "ckpt"),
        "TB_DIR": str(tmp_path / "tb"),
        "TRAIN_ITERS": "5",
    }
    script = ROOT / "examples" / "slurm" / "sip_tiny_cpu.sbatch"
    fields = wait_for_job(submit(script, env=env, workdir=tmp_path), timeout=300)
    output = job_output(fields)
    assert fields["JobState"] == "COMPLETED", output[-4000:]
    for rank in (0, 1):
        assert f"rank {rank}/2 (slurm launch" in output, output[-4000:]
    assert "TP=2 PP=1 DP=1" in output and "iteration      5/5" in output
    assert read_tracker(tmp_path / "ckpt") == 5


_LOSS_LINE = re.compile(r"iteration +(\d+)/\d+ \|.*?\| lm loss (\S+)")


def _losses(output: str) -> dict[int, str]:
    """{iteration: logged lm loss}; an iteration logged twice fails (a step redone)."""
    losses: dict[int, str] = {}
    for match in _LOSS_LINE.finditer(output):
        iteration = int(match.group(1))
        assert iteration not in losses, f"iteration {iteration} logged twice:\n{output[-4000:]}"
        losses[iteration] = match.group(2)
    return losses


def _wait_for(predicate, what: str, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"no {what} after {timeout:.0f}s")


def test_signalled_job_saves_requeues_and_matches_an_uninterrupted_run(slurm_cluster, tmp_path):
    """SIGUSR1 (what `#SBATCH --signal=USR1@60` sends before the time limit) mid-run: the ranks
    save the current iteration and exit 0, the script requeues the job, the restart resumes and
    logs the same losses as a run never interrupted."""
    from megatron_sip.models.checkpointing import read_tracker

    from .pretrain_utils import ROOT, preprocess, write_counting_corpus

    write_counting_corpus(tmp_path / "corpus.jsonl")
    data_path = preprocess(tmp_path / "corpus.jsonl", tmp_path / "corpus")
    script = ROOT / "examples" / "slurm" / "pretrain_tiny_cpu.sbatch"
    jobs = {}
    for name in ("preempted", "reference"):
        (tmp_path / name).mkdir()
        env = {
            "REPO": str(ROOT), "PYTHON": sys.executable, "DATA_PATH": data_path,
            "CKPT_DIR": str(tmp_path / name / "ckpt"), "TB_DIR": str(tmp_path / name / "tb"),
            "TRAIN_ITERS": "20",
        }  # fmt: skip
        jobs[name] = submit(script, env=env, workdir=tmp_path / name)
    preempted = jobs["preempted"]
    log = tmp_path / "preempted" / f"sip-pretrain-tiny-{preempted}.out"

    def training():
        return log.exists() and "iteration      1/20" in log.read_text()

    _wait_for(training, "iteration 1 in the log", timeout=300, poll=0.1)
    subprocess.run(["scancel", "--signal=USR1", preempted], check=True, timeout=30)

    def requeued():
        fields = job_info(preempted)
        return fields if fields and fields.get("Restarts") == "1" else None

    fields = _wait_for(requeued, "requeue", timeout=120)
    if fields.get("JobState") == "PENDING":
        # SLURM holds a requeued job for about two minutes (Reason=BeginTime): start it now.
        subprocess.run(["scontrol", "update", f"JobId={preempted}", "StartTime=now"],
                       capture_output=True, timeout=30)  # fmt: skip
    results = {name: wait_for_job(job, timeout=400) for name, job in jobs.items()}
    output = {name: job_output(fields) for name, fields in results.items()}
    for name in jobs:
        assert results[name]["JobState"] == "COMPLETED", output[name][-4000:]
        assert read_tracker(tmp_path / name / "ckpt") == 20
    stopped = re.search(r"exiting at iteration (\d+) after receiving SIGUSR1", output["preempted"])
    assert stopped, output["preempted"][-4000:]
    assert f"stopped at iteration {stopped.group(1)} of 20; requeueing" in output["preempted"]
    assert "restart 1 on" in output["preempted"]
    assert "requeueing" not in output["reference"]
    reference = _losses(output["reference"])
    assert sorted(reference) == list(range(1, 21))
    assert _losses(output["preempted"]) == reference
