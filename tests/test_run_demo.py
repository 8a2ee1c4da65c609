"""tools/run_demo.py's stage cache: a stage is reused only while its command, flags file, code
and upstream stages are unchanged, and its outputs appear only when it succeeds."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from .pretrain_utils import ROOT


def _run_demo_module():
    spec = importlib.util.spec_from_file_location("run_demo", ROOT / "tools" / "run_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


SCRIPT = """
import sys
from pathlib import Path
out = Path(sys.argv[1])
count = Path(sys.argv[2])
count.write_text(str(int(count.read_text() or 0) + 1) if count.exists() else "1")
if "--fail" in sys.argv:
    out.write_text("partial")
    sys.exit(3)
out.write_text("{marker}")
"""


def test_stage_cache_follows_command_code_and_upstream(tmp_path):
    run_demo = _run_demo_module()
    script, count = tmp_path / "stage.py", tmp_path / "runs.txt"
    script.write_text(SCRIPT.format(marker="v1"))

    cache = tmp_path / "out" / "cache"

    def run(package="p1", upstream="u1", extra=()):
        runner = run_demo.DemoRunner(tmp_path / "out", run_demo.PRESETS["short"], 1, False, 1)
        runner.package_fingerprint = package
        runner.keys["upstream"] = upstream
        output = tmp_path / "out" / "result.txt"
        command = [sys.executable, script, output, count, *extra]
        runner.stage("stage", command, [output], depends=["upstream"], stale=[cache])
        return int(count.read_text()), output.read_text()

    assert run() == (1, "v1")
    cache.mkdir()  # something derived from the output, as Megatron's sample-index cache
    assert run() == (1, "v1")  # reused
    assert cache.is_dir()  # and what derives from it kept
    assert run(package="p2") == (2, "v1")  # the package changed
    assert not cache.exists()  # a rerun removes what derived from the old output
    script.write_text(SCRIPT.format(marker="v2"))
    assert run(package="p2") == (3, "v2")  # the stage's own script changed
    assert run(package="p2", upstream="u2") == (4, "v2")  # an upstream stage changed
    assert run(package="p2", upstream="u2") == (4, "v2")
    with pytest.raises(SystemExit, match="failed"):
        run(package="p2", upstream="u2", extra=["--fail"])
    # The failed run left no stamp: the next run redoes the stage.
    assert run(package="p2", upstream="u2") == (6, "v2")


def test_package_fingerprint_covers_the_package_source(tmp_path):
    run_demo = _run_demo_module()
    files = {path for pattern in run_demo.PACKAGE_SOURCES for path in ROOT.glob(pattern)}
    names = {path.relative_to(ROOT).as_posix() for path in files}
    assert "megatron_sip/train_sip.py" in names
    assert "csrc/dpo_logratio_cpu.cpp" in names
    runner = run_demo.DemoRunner(tmp_path, run_demo.PRESETS["short"], 1, False, 1)
    assert runner.package_fingerprint == run_demo._fingerprint(files)
