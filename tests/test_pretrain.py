"""The pretraining entry point: exact resume, validation loss falls, continual --finetune."""

from __future__ import annotations

import re

import pytest

from megatron_sip.models.checkpointing import read_tracker

from .pretrain_utils import preprocess, run_pretrain, scalars, write_counting_corpus

pytestmark = pytest.mark.slow

ITERS = 8
COMMON = ["--split", "90,10,0", "--train-iters", str(ITERS), "--log-interval", "1"]
NO_EVAL = ["--eval-iters", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_counting_corpus(root / "corpus.jsonl")
    return preprocess(root / "corpus.jsonl", root / "corpus")


# Data-parallel resume (a single rank's groups are trivial) is exercised end to end by
# test_slurm's preempted job (DP=2) and the SIP resume test.
@pytest.mark.parametrize(
    "nproc,layout",
    [
        (2, ["--tensor-model-parallel-size", "2"]),
        (2, ["--pipeline-model-parallel-size", "2"]),
    ],
    ids=["tp2", "pp2"],
)
def test_resume_reproduces_uninterrupted_losses(corpus, tmp_path, nproc, layout):
    flags = [*layout, *COMMON, *NO_EVAL, "--data-path", corpus]
    run_pretrain(nproc, *flags, "--tensorboard-dir", str(tmp_path / "tb_straight"))
    straight = scalars(tmp_path / "tb_straight", "lm loss")
    assert sorted(straight) == list(range(1, ITERS + 1))

    ckpt = str(tmp_path / "ckpt")
    first = run_pretrain(
        nproc, *flags, "--exit-interval", "4", "--save", ckpt,
        "--tensorboard-dir", str(tmp_path / "tb_first"),
    )  # fmt: skip
    assert "exiting at iteration 4" in first
    assert read_tracker(ckpt) == 4
    second = run_pretrain(
        nproc, *flags, "--load", ckpt, "--save", ckpt,
        "--tensorboard-dir", str(tmp_path / "tb_second"),
    )  # fmt: skip
    assert "resuming from" in second and "at iteration 4" in second
    resumed = {
        **scalars(tmp_path / "tb_first", "lm loss"),
        **scalars(tmp_path / "tb_second", "lm loss"),
    }
    assert sorted(resumed) == list(range(1, ITERS + 1))
    assert resumed == straight  # bit for bit
    assert read_tracker(ckpt) == ITERS


def test_two_process_pretraining_reduces_validation_loss(corpus, tmp_path):
    output = run_pretrain(
        2, "--data-path", corpus, "--split", "90,10,0", "--train-iters", "30",
        "--eval-interval", "10", "--eval-iters", "2", "--log-interval", "10",
        "--tensorboard-dir", str(tmp_path / "tb"),
    )  # fmt: skip
    assert "DP=2" in output
    validation = scalars(tmp_path / "tb", "lm loss validation")
    assert sorted(validation) == [10, 20, 30]
    assert validation[30] < validation[10] - 0.5, validation
    assert re.search(r"validation at iteration 30 \| lm loss", output)


def test_finetune_loads_weights_and_restarts(corpus, tmp_path):
    ckpt = str(tmp_path / "base")
    flags = [*COMMON, *NO_EVAL, "--data-path", corpus]
    run_pretrain(1, *flags, "--save", ckpt, "--tensorboard-dir", str(tmp_path / "tb_base"))
    base = scalars(tmp_path / "tb_base", "lm loss")
    output = run_pretrain(
        1, *flags, "--load", ckpt, "--finetune", "--tensorboard-dir", str(tmp_path / "tb_ft")
    )
    assert "--finetune: weights from" in output
    continued = scalars(tmp_path / "tb_ft", "lm loss")
    assert sorted(continued) == list(range(1, ITERS + 1))  # iteration restarted at 0
    assert continued[1] < base[1] - 0.5  # but from the trained weights


def test_damaged_data_exits_2_naming_the_file(corpus, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from .pretrain_utils import NULL_TOKENIZER, TINY_ARGS

    prefix = str(tmp_path / "corpus_text_document")
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus + suffix, prefix + suffix)
    os.truncate(prefix + ".idx", os.path.getsize(prefix + ".idx") - 8)
    # (missing files and the other damage: tests/test_training_flags.py, in-process)
    result = subprocess.run(
        [sys.executable, "-m", "megatron_sip.pretrain", TINY_ARGS, *NULL_TOKENIZER,
         "--data-path", prefix],
        capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK"))},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"--data-path: {prefix}.idx is truncated" in result.stderr
    assert "tools/preprocess_data.py" in result.stderr
    assert "Traceback" not in result.stderr


def test_mock_data_sample_based_with_overlapped_distributed_optimizer(tmp_path):
    """Megatron-LM's --mock-data (MockGPTDataset, its attention masks passed to the model) and
    sample-based WSD schedule, with overlapped gradient reduction and parameter gathering and the
    per-token loss, at DP=2; the final save gathers the last step's parameters first."""
    import shlex

    from .pretrain_utils import NULL_TOKENIZER, ROOT, run_module

    # The tiny model without its iteration-based schedule (iterations and samples do not mix).
    tiny = shlex.split((ROOT / "examples" / "tiny_llama_cpu.args").read_text(), comments=True)
    for flag in ("--train-iters", "--lr-warmup-iters"):
        index = tiny.index(flag)
        del tiny[index : index + 2]
    output = run_module(
        2, "megatron_sip.pretrain", *tiny, *NULL_TOKENIZER, "--mock-data",
        "--train-samples", "36", "--lr-warmup-samples", "8", "--lr-decay-style", "WSD",
        "--lr-wsd-decay-samples", "16", "--eval-iters", "1", "--eval-interval", "2",
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
        "--calculate-per-token-loss", "--save", str(tmp_path / "ckpt"),
    )  # fmt: skip
    # 36 samples at a global batch of 8: 4 steps (Megatron-LM's train_samples // batch).
    steps = re.findall(r"iteration +\d+/4 .*?learning rate ([0-9.E+-]+).*?lm loss ([0-9.E+-]+)",
                       output)  # fmt: skip
    assert len(steps) == 4, output[-3000:]
    learning_rates = [float(lr) for lr, _ in steps]
    # After 0, 8, 16, 24 samples: warm-up to --lr 3e-3 over 8, stable until 36 - 16 = 20, then
    # the exponential anneal towards --min-lr 3e-4 (4 of its 16 samples done at 24).
    anneal = 3e-4 + (2 * 0.5 ** (4 / 16) - 1) * (3e-3 - 3e-4)
    assert learning_rates == pytest.approx([0.0, 3e-3, 3e-3, anneal], rel=1e-5)
    assert all(0 < float(loss) < 10 for _, loss in steps)
    assert "validation at iteration 4" in output
    assert read_tracker(tmp_path / "ckpt") == 4
