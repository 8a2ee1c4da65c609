"""tools/bench/bench_dpo_logratio.py: a tiny CPU run, its check against naive, and the adapter
that measures a cross-entropy kernel with reduction="none" (Liger-Kernel's on GPU; torch's here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "bench" / "bench_dpo_logratio.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_dpo_logratio", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(bench, sequences=6, tokens=5, vocab=40):
    args = type("Args", (), dict(sequences=sequences, tokens=tokens, vocab=vocab, dtype="float32"))
    policy, reference, targets, mask = bench.make_inputs(args, "cpu")
    mask[0] = 0  # an empty sequence: every one of its targets is ignored
    return policy, reference, targets, mask


def test_cross_entropy_adapter_matches_naive():
    bench = _bench_module()
    inputs = _inputs(bench)
    steps = {
        "naive": bench.naive_step,
        "torch_ce": bench.cross_entropy_step(torch.nn.functional.cross_entropy),
    }
    loss_error, grad_error = bench.check_against_naive(steps, inputs)["torch_ce"]
    assert loss_error < 1e-5 and grad_error < 1e-5


def test_check_against_naive_catches_a_wrong_variant():
    """A kernel with a wrong temperature is reported as wrong."""
    bench = _bench_module()
    inputs = _inputs(bench)

    def halved_logits(logits, targets, **kwargs):
        return torch.nn.functional.cross_entropy(logits * 0.5, targets, **kwargs)

    steps = {"naive": bench.naive_step, "halved": bench.cross_entropy_step(halved_logits)}
    loss_error, grad_error = bench.check_against_naive(steps, inputs)["halved"]
    assert loss_error > 1e-3 and grad_error > 0.1


def test_tiny_cpu_run_reports_speedup_and_memory():
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--sequences",
            "4",
            "--tokens",
            "8",
            "--vocab",
            "512",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--check-sequences",
            "4",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["speedup"] > 0 and summary["peak_memory_ratio"] > 0
    assert set(summary["results"]) == {"naive", "ours"}
    assert summary["results"]["ours"]["grad_error"] < 1e-4
