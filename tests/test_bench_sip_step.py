"""tools/bench/bench_sip_step.py: a tiny run of the whole-step benchmark (ours beside the
straightforward transformers step) passes its loss check and prints its ratios; the check catches
a scoring off-by-one in the transformers step."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from .distributed import run_ranks

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "bench" / "bench_sip_step.py"
KEYS = (
    "step_speedup",
    "scoring_speedup",
    "generation_speedup",
    "peak_memory_ratio",
    "hf_step_s",
    "ours_step_s",
)


def _bench_module():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_sip_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_checks_both_variants_and_prints_the_ratios():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "check: same losses and margins" in out
    for phase in ("generate", "reference", "forward_backward", "optimizer", "ema", "total"):
        assert any(
            line.split()[:1] == [phase] and len(line.split()) == 4 for line in out.splitlines()
        )
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) == set(KEYS)
    assert all(value > 0 for value in summary.values())


def test_check_compares_losses_and_margins():
    bench = _bench_module()
    row = {"update": 1, "ours_loss": 0.5, "hf_loss": 0.5, "ours_margin": 2.0, "hf_margin": 2.0}
    assert bench.check_report([row])
    assert not bench.check_report([{**row, "hf_margin": 2.01}])
    assert not bench.check_report([{**row, "hf_loss": 0.501}])


def _off_by_one_check(root: str, out: str) -> None:
    bench = _bench_module()
    args = bench.parse_args(["--tiny"])
    args.corpus = bench.write_corpus(Path(root), args)
    score = bench.HFStep.sequence_log_probs

    def off_by_one(self, model, prefix, candidates):
        # A classic slip: each candidate's last token left out of its log-probability.
        return score(self, model, prefix, [c[:-1] for c in candidates])

    bench.HFStep.sequence_log_probs = off_by_one
    Path(out).write_text(json.dumps(bench.run_check(args)["rows"]))


def test_check_catches_a_scoring_slip(tmp_path):
    run_ranks(_off_by_one_check, 1, str(tmp_path), str(tmp_path / "rows.json"))
    rows = json.loads((tmp_path / "rows.json").read_text())
    bench = _bench_module()
    assert bench.check_report(rows[:1])  # both start from the same weights: the same log 2
    assert not bench.check_report(rows)  # after one update the margins differ
