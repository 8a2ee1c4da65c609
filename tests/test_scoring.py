"""Shared-prefix packed scoring equals scoring every (prefix + candidate) separately."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from megatron_sip.inference.scoring import (
    candidate_log_probs,
    pack_candidates,
    scoring_forward_step,
    supports_packed_scoring,
    unpack_candidates,
)
from megatron_sip.initialize import destroy_distributed
from megatron_sip.models.checkpointing import load_checkpoint
from megatron_sip.training.step import configure_schedule, forward_backward

from . import workers
from .distributed import run_ranks
from .test_generation import _trained_weights

PREFIXES = [[5, 17, 42, 9, 33, 71, 2, 8, 8, 1], [100, 3, 3, 8, 250, 16, 9]]
CANDIDATES = [
    [[1, 2, 3, 4, 5, 6], [9, 9, 9, 9, 9, 9], [40, 41, 42, 43], [7, 100, 7, 100, 7, 100]],
    [[3, 3, 3, 3, 3, 3], [200, 201, 202, 203, 204, 205], [17, 18, 19, 20, 21, 22], [5, 6]],
]


def _loss(packed, tp_group, logits):
    token_log_probs = candidate_log_probs(logits, packed, tp_group=tp_group)
    count = packed.mask.sum()
    return (
        -token_log_probs.sum(),
        count.to(torch.int),
        {"token_log_probs": token_log_probs.detach()},
    )


def _score(chunks, packed):
    """Token log-probs (last stage) and the gradient of their sum, through Megatron's schedule."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    reports = forward_backward(
        partial(scoring_forward_step, packed, _loss),
        iter([None]),
        chunks,
        num_microbatches=1,
        seq_length=packed.tokens.shape[1],
        micro_batch_size=packed.tokens.shape[0],
    )
    grads = workers.named_grads(chunks)
    return (reports[0]["token_log_probs"] if reports else None), grads


def scoring_worker(root: str, tp: int, pp: int) -> None:
    parallel, context = workers.setup(tp=tp, pp=pp)
    chunks, config = workers.build(parallel, context)
    configure_schedule(config, chunks)
    load_checkpoint(root, chunks)
    assert supports_packed_scoring(chunks[0])
    packed = pack_candidates(PREFIXES, CANDIDATES)
    unpacked = unpack_candidates(PREFIXES, CANDIDATES)
    assert packed.tokens_processed < unpacked.tokens_processed
    packed_lp, packed_grads = _score(chunks, packed)
    unpacked_lp, unpacked_grads = _score(chunks, unpacked)
    if packed_lp is not None:
        torch.testing.assert_close(packed_lp, unpacked_lp, atol=1e-5, rtol=0)
        assert packed_lp[1, 3, 2:].eq(0).all()  # padding of the short candidate counts nothing
        assert packed_lp[0, 0].lt(0).all()
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], unpacked_grads[name], atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in packed_grads.values())
    destroy_distributed()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring") / "ckpt"
    run_ranks(_trained_weights, 1, str(root))
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "world,tp,pp", [(1, 1, 1), (2, 2, 1), (2, 1, 2)], ids=["tp1", "tp2", "pp2"]
)
def test_packed_scoring_matches_unpacked(weights, world, tp, pp):
    run_ranks(scoring_worker, world, str(weights), tp, pp)


def test_packed_layout():
    packed = pack_candidates([[1, 2, 3]], [[[4, 5], [6, 7]]])
    assert packed.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4]]
    allowed = ~packed.attention_mask[0, 0]
    assert allowed[5].tolist() == [True, True, True, False, False, True, False]  # c2 sees prefix
    assert allowed[4].tolist() == [True, True, True, True, True, False, False]
    assert packed.predict_from.tolist() == [[[2, 3], [2, 5]]]


def test_benchmark_runs_and_reports_its_ratios():
    """A tiny run of tools/bench/bench_rollouts_scoring.py: it must keep working (the speed
    goals are measured by running it at its default sizes, see docs/ops.md)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "tools" / "bench" / "bench_rollouts_scoring.py"),
         "--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4",
         "--vocab-size", "256", "--prefix-len", "32", "--suffix-len", "8", "--candidates", "3",
         "--gen-prefix-len", "8", "--gen-samples", "2", "--repeats", "1"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "0"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ratios = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(ratios) == {
        "scoring_token_ratio", "scoring_speedup", "scoring_memory_ratio", "generation_speedup"
    }  # fmt: skip
    assert ratios["scoring_token_ratio"] == round((3 * 40) / (32 + 3 * 8), 3)
