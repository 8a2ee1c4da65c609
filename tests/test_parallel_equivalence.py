"""TP=2 and PP=2 forward + backward match TP=1 with the same weights: logits, loss, gradients."""

from __future__ import annotations

import pytest
import torch

from megatron_sip.initialize import destroy_distributed
from megatron_sip.models.checkpointing import load_checkpoint, save_checkpoint
from megatron_sip.models.gpt import build_gpt_model

from . import workers
from .distributed import run_ranks

pytestmark = pytest.mark.slow

ATOL, RTOL = 2e-5, 1e-4


def reference_worker(root: str) -> None:
    parallel, context = workers.setup(tp=1, pp=1)
    chunks, _ = workers.build(parallel, context)
    save_checkpoint(f"{root}/weights", 0, chunks)
    logits, loss = workers.logits_and_loss(chunks, workers.fixed_batch(), forward_only=False)
    torch.save({"logits": logits, "loss": loss}, f"{root}/reference.pt")
    # The gradients, written as if they were weights, reshard to any layout like weights do.
    for name, grad in workers.named_grads(chunks).items():
        dict(chunks[0].module.named_parameters())[name].data.copy_(grad)
    save_checkpoint(f"{root}/grads", 0, chunks)
    destroy_distributed()


def parallel_worker(root: str, tp: int, pp: int) -> None:
    parallel, context = workers.setup(tp=tp, pp=pp)
    chunks, config = workers.build(parallel, context)
    load_checkpoint(f"{root}/weights", chunks)
    logits, loss = workers.logits_and_loss(chunks, workers.fixed_batch(), forward_only=False)
    reference = torch.load(f"{root}/reference.pt")
    if logits is not None:  # last pipeline stage
        torch.testing.assert_close(logits, reference["logits"], atol=ATOL, rtol=RTOL)
        assert loss == pytest.approx(reference["loss"], rel=1e-5)
    # Reference gradients in this rank's shard layout.
    reference_grads = build_gpt_model(
        workers.tiny_llama(), config, workers.VOCAB, context.pg_collection
    )
    load_checkpoint(f"{root}/grads", [reference_grads])
    expected = workers.named_params(reference_grads)
    actual = workers.named_grads(chunks)
    assert actual.keys() == expected.keys()
    assert len(actual) > 0
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name], atol=ATOL, rtol=RTOL, msg=name)
    destroy_distributed()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    run_ranks(reference_worker, 1, str(root))
    return root


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parallel_matches_single_rank(reference, tp, pp):
    run_ranks(parallel_worker, 2, str(reference), tp, pp)
