"""A small learnable corpus, preprocessed with the real tool, and a runner for the real entry
point under torchrun."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from .distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = f"@{ROOT / 'examples' / 'tiny_llama_cpu.args'}"
VOCAB = 512  # the NullTokenizer's vocabulary: ids 0..510 and EOD 511 (--vocab-size 511)
NULL_TOKENIZER = ("--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1))


ALPHABET = 64  # documents use the first 64 ids of the vocabulary


def write_counting_corpus(path: Path, documents: int = 300, seed: int = 0) -> None:
    """Documents of whitespace-separated token ids that count up (mod 64) by a per-document
    stride: a model that learns the pattern predicts most tokens, so validation loss falls fast."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(documents):
            stride = rng.choice([1, 2, 3, 5])
            start = rng.randrange(ALPHABET)
            length = rng.randrange(40, 200)
            ids = [(start + i * stride) % ALPHABET for i in range(length)]
            handle.write(json.dumps({"text": " ".join(map(str, ids))}) + "\n")


def preprocess(jsonl: Path, output_prefix: Path) -> str:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(jsonl),
         "--output-prefix", str(output_prefix), "--tokenizer-type", "NullTokenizer",
         "--vocab-size", str(VOCAB - 1), "--append-eod", "--workers", "1"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return f"{output_prefix}_text_document"


def run_pretrain(nproc: int, *flags: str, timeout: int = 600) -> str:
    """Runs ``python -m megatron_sip.pretrain`` on ``nproc`` ranks; returns its output."""
    return run_module(nproc, "megatron_sip.pretrain", TINY_ARGS, *NULL_TOKENIZER, *flags,
                      timeout=timeout)  # fmt: skip


def run_module(nproc: int, module: str, *flags: str, timeout: int = 600) -> str:
    """Runs ``python -m MODULE`` under torchrun on ``nproc`` ranks; returns its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", module, *flags,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM: torchrun stops its ranks (each in a session of its own) before it exits; a
        # SIGKILL would leave them running.
        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = "", "(torchrun did not stop on SIGTERM)"
        raise AssertionError(f"timed out after {timeout} s:\n{(stdout + stderr)[-6000:]}") from None
    output = stdout + stderr
    assert process.returncode == 0, output[-6000:]
    return output


def scalars(tensorboard_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one TensorBoard scalar, exactly as written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(tag)}
