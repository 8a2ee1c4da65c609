"""The embedded-default pipeline end to end, shortened: corpus, tokenizer, indexed data, base
pretraining, NLL vs SIP continual training, the learned judge and rewriter and SIP with them,
held-out continuations, oracle comparison, report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .pretrain_utils import ROOT


@pytest.mark.slow
def test_short_demo_sip_is_safer_than_the_baseline(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "run_demo.py"), "--output-dir", str(out),
         "--preset", "short", "--learned-roles"],
        capture_output=True, text=True, timeout=2400,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    report = json.loads((out / "report.json").read_text())
    print(result.stdout[-2000:])
    baseline, sip = report["baseline"], report["sip"]
    assert sip["safety"] > baseline["safety"], report
    assert 0 <= sip["quality_win_rate"] <= 100
    assert 0 <= sip["quality_win_rate_both_safe"] <= 100  # quality where safety cannot decide
    low, high = sip["quality_win_rate_both_safe_ci95"]
    assert low <= sip["quality_win_rate_both_safe"] <= high
    # The learned roles: a column of their own, their measurements, their checkpoints.
    learned = report["sip_learned"]
    assert set(learned) == set(sip), (learned, sip)
    assert 0 <= learned["quality_win_rate"] <= 100
    roles = report["roles"]
    assert set(roles["judge"]["accuracy"]) == {"safety", "pairwise", "factuality"}
    assert all(0 <= v <= 1 for v in roles["judge"]["accuracy"].values()), roles["judge"]
    assert 0 <= roles["rewriter"]["rewrite_safety"] <= 1
    assert roles["rewriter"]["copy_rate"] is None or 0 <= roles["rewriter"]["copy_rate"] <= 1
    assert roles["judge"]["appeals"]["variants"], roles["judge"]
    gold = roles["judge"]["gold_agreement"]
    assert not gold or 0 <= gold["pooled"] <= 1, gold
    for role in ("judge", "rewriter"):
        assert (out / "roles" / role / "latest_checkpointed_iteration.txt").is_file(), role
    assert "SIP (learned roles)" in (out / "report.md").read_text()
    for name in ("report.md", "reward.png", "safety.png", "comparison.png"):
        assert (out / name).stat().st_size > 0, name
    # The printed table ends the run.
    assert "Quality win rate" in result.stdout.splitlines()[-1]
