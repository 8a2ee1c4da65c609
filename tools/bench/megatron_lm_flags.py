"""Runs the flags of a Megatron-LM example script (``examples/megatron_lm/*.args``) at a tiny shape
on this machine's device, and says which flags the device refuses and why.

    python tools/bench/megatron_lm_flags.py --output-dir /tmp/llama3 --nproc 1

Each flag the run refuses (a ConfigError while parsing, e.g. FP8 without Transformer Engine) is
printed with its reason and dropped; a refusal that names a ``--no-...`` flag the script does not
pass (a fusion whose kernel is missing) adds that flag instead. Then the remaining flags train
under torchrun. ``tools/bench/gpu_check.sh`` runs it on a GPU; on the CPU
``tests/test_megatron_lm_scripts.py`` asserts the same refusals one by one.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron_sip.arguments import parse_args  # noqa: E402
from megatron_sip.errors import ConfigError  # noqa: E402
from megatron_sip.pretrain import PretrainConfig  # noqa: E402


def read_flags(path: Path) -> list[str]:
    """The flags of an args file, split as ``@file`` is read (``#`` starts a comment)."""
    return [token for line in path.read_text().splitlines() for token in shlex.split(line, True)]


def drop(flags: list[str], name: str) -> list[str]:
    """``flags`` without every occurrence of ``name`` and its values."""
    kept, skipping = [], False
    for token in flags:
        if token.startswith("--"):
            skipping = token == name
        if not skipping:
            kept.append(token)
    return kept


def accepted_flags(flags: list[str], world_size: int) -> tuple[list[str], list[str]]:
    """(the flags this device runs, the refusals as 'flag: reason' lines)."""
    refusals = []
    for _ in range(len(flags)):
        try:
            parse_args(flags, PretrainConfig, world_size=world_size, exit_on_error=False)
            return flags, refusals
        except ConfigError as error:
            refusals.append(str(error))
            if error.flag in flags:
                flags = drop(flags, error.flag)
            elif error.flag.startswith("--no-"):
                flags = [*flags, error.flag]
            else:
                raise
    raise RuntimeError("the refusals do not converge: " + "; ".join(refusals))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--script", default="train_llama3_8b_h100_fp8", help="an examples/megatron_lm/*.args name"
    )
    parser.add_argument("--tiny", default="tiny_llama3", help="the tiny-shape args file after it")
    parser.add_argument("--output-dir", required=True, help="checkpoints and TensorBoard events")
    parser.add_argument("--nproc", type=int, default=1, help="ranks (torchrun --nproc-per-node)")
    args = parser.parse_args(argv)

    scripts, out = ROOT / "examples" / "megatron_lm", Path(args.output_dir)
    paths = [
        "--save", str(out / "ckpt"), "--load", str(out / "ckpt"),
        "--tensorboard-dir", str(out / "tb"), "--data-cache-path", str(out / "cache"),
    ]  # fmt: skip
    flags = [
        *read_flags(scripts / f"{args.script}.args"),
        *read_flags(scripts / f"{args.tiny}.args"),
        *paths,
    ]
    flags, refusals = accepted_flags(flags, args.nproc)
    print(f"{args.script}: {len(refusals)} refusal(s) on this device")
    for line in refusals:
        print(f"  refused {line}")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(args.nproc), "-m", "megatron_sip.pretrain", *flags,
    ]  # fmt: skip
    print("running:", shlex.join(command[3:]), flush=True)
    sys.exit(subprocess.run(command, cwd=ROOT, env={**os.environ}).returncode)


if __name__ == "__main__":
    main()
