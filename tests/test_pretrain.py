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


@pytest.mark.parametrize(
    "nproc,layout",
    [
        (1, []),
        (2, ["--tensor-model-parallel-size", "2"]),
        (2, ["--pipeline-model-parallel-size", "2"]),
    ],
    ids=["tp1", "tp2", "pp2"],
)
def test_resume_reproduces_uninterrupted_losses(corpus, tmp_path, nproc, layout):
    flags = [*layout, *COMMON, *NO_EVAL, "--data-path", corpus]
    run_pretrain(nproc, *flags, "--tensorboard-dir", str(tmp_path / "tb_straight"))
    straight = scalars(tmp_path / "tb_straight", "train/lm loss")
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
        **scalars(tmp_path / "tb_first", "train/lm loss"),
        **scalars(tmp_path / "tb_second", "train/lm loss"),
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
    validation = scalars(tmp_path / "tb", "validation/lm loss")
    assert sorted(validation) == [10, 20, 30]
    assert validation[30] < validation[10] - 0.5, validation
    assert re.search(r"validation at iteration 30 \| lm loss", output)


def test_finetune_loads_weights_and_restarts(corpus, tmp_path):
    ckpt = str(tmp_path / "base")
    flags = [*COMMON, *NO_EVAL, "--data-path", corpus]
    run_pretrain(1, *flags, "--save", ckpt, "--tensorboard-dir", str(tmp_path / "tb_base"))
    base = scalars(tmp_path / "tb_base", "train/lm loss")
    output = run_pretrain(
        1, *flags, "--load", ckpt, "--finetune", "--tensorboard-dir", str(tmp_path / "tb_ft")
    )
    assert "--finetune: weights from" in output
    continued = scalars(tmp_path / "tb_ft", "train/lm loss")
    assert sorted(continued) == list(range(1, ITERS + 1))  # iteration restarted at 0
    assert continued[1] < base[1] - 0.5  # but from the trained weights
