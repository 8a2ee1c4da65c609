"""Sequence parallelism at TP=2 equals TP=2 without it, from the same weights: pretraining steps,
candidate scoring, and a SIP step (rollouts decoded without SP, reference scoring, the DPO update);
with zero-centred gamma (--apply-layernorm-1p) on the CPU platform's norm."""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from megatron_sip.inference.generation import generate
from megatron_sip.inference.sampling import SamplingConfig
from megatron_sip.inference.scoring import layout_for
from megatron_sip.initialize import destroy_distributed
from megatron_sip.models.checkpointing import unwrap_model
from megatron_sip.platform import LocalNorm
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.lm_loss import lm_forward_step
from megatron_sip.training.optimizer import build_optimizer
from megatron_sip.training.sip.batches import (
    BatchBuilder,
    attach_reference_log_probs,
    global_counts,
    sip_forward_step,
)
from megatron_sip.training.sip.candidates import ScoredSample
from megatron_sip.training.sip.config import SIPConfig
from megatron_sip.training.sip.objectives import OBJECTIVES
from megatron_sip.training.sip.selection import ORIGINAL, ROLLOUT, Candidate, Selection
from megatron_sip.training.step import configure_schedule, train_step

from . import workers
from .distributed import run_ranks
from .test_scoring import CANDIDATES, PREFIXES
from .test_scoring import _score as score_packed

STEPS = 3
# Rows of 31 and 27 positions: odd, so sequence parallelism at TP=2 needs a padded row.
SCORED = [[*CANDIDATES[0][:3], CANDIDATES[0][3][:5]], CANDIDATES[1]]


def _build(parallel, context, weights=None):
    """The tiny Llama with zero-centred gamma, its optimizer and schedule; ``weights`` (a state
    dict of the same layout) replaces its random initialisation."""
    # SGD: an update proportional to the gradient keeps float-level differences float-level.
    training = TrainingConfig(
        micro_batch_size=workers.BATCH, lr=0.1, train_iters=10, clip_grad=0, optimizer="sgd"
    )
    chunks, config = workers.build(
        parallel,
        context,
        workers.tiny_llama(apply_layernorm_1p=True),
        calculate_per_token_loss=True,
    )
    if weights is not None:
        unwrap_model(chunks[0]).load_state_dict(weights, strict=False)
    optimizer, scheduler = build_optimizer(training, chunks, context.data_parallel_size)
    configure_schedule(config, chunks, optimizer)
    return chunks, optimizer, scheduler


def _pretrain(chunks, optimizer, scheduler):
    """Losses and grad norms of STEPS steps, and the gradients of the first."""
    losses, grads = [], None
    for step in range(STEPS):
        result = train_step(
            lm_forward_step,
            iter([workers.fixed_batch(step)]),
            chunks,
            optimizer,
            scheduler,
            num_microbatches=1,
            seq_length=workers.SEQ,
            micro_batch_size=workers.BATCH,
            samples_per_step=workers.BATCH,
        )
        losses.append((result.losses["lm loss"], result.grad_norm))
        grads = grads or workers.named_grads(chunks)
    return losses, grads


def _score(chunks):
    """Candidate token log-probs and the gradients of their sum (odd row lengths: layout_for
    pads them to a multiple of TP under sequence parallelism)."""
    packed = layout_for(chunks[0], PREFIXES, SCORED)
    log_probs, grads = score_packed(chunks, packed)
    return packed.tokens.shape[1], log_probs, grads


def _sip_step(chunks, optimizer, scheduler):
    """Rollouts from the model, then one online-DPO step (with the original's NLL and the KL
    probe) on hand-made selections: chosen the original, rejected the first rollout."""
    prefixes = [p[:7] for p in PREFIXES]
    rollouts = generate(
        chunks[0],
        prefixes,
        num_samples=2,
        num_tokens=5,
        sampling=SamplingConfig(),
        seed=7,
        vocab_size=workers.VOCAB,
    )
    originals = [[11, 12, 13, 14], [60, 61, 62]]
    log_probs = rollouts.sequence_log_probs().tolist()
    scored = [
        ScoredSample(
            sample=None,
            prefix=prefix,
            original=original,
            rewrite=None,
            rollouts=candidates,
            rollout_log_probs=row_log_probs,
            scores={},
            rewards=None,
            selection=Selection(Candidate(ORIGINAL, 0), Candidate(ROLLOUT, 0)),
        )
        for prefix, original, candidates, row_log_probs in zip(
            prefixes, originals, rollouts.as_candidates(), log_probs
        )
    ]
    objective, sip = OBJECTIVES["online_dpo"], SIPConfig(sip_nll_weight=0.1)
    fused = sip.fused_logprob("cpu")  # the fused log-prob op where its kernel is built
    # length_multiple 1: the padding for sequence parallelism comes from the model.
    builder = BatchBuilder(objective, sip, pad_id=0, kl_probe=True)
    batches, length, reference_length = builder.build(chunks[0], [scored])
    counts = global_counts(batches, objective, sip, None)
    attach_reference_log_probs(chunks[0], batches, reference_length, fused)
    result = train_step(
        partial(sip_forward_step, objective, sip, counts, fused),
        iter(batches),
        chunks,
        optimizer,
        scheduler,
        num_microbatches=1,
        seq_length=length,
        micro_batch_size=len(scored),
        samples_per_step=len(scored),
    )
    return rollouts.tokens, length, result.losses, result.grad_norm, workers.named_grads(chunks)


def sequence_parallel_worker() -> None:
    parallel, context = workers.setup(tp=2)
    results = {}
    weights = None
    for sp in (False, True):
        layout = dataclasses.replace(parallel, sequence_parallel=sp)
        chunks, optimizer, scheduler = _build(layout, context, weights)
        module = unwrap_model(chunks[0])
        norms = [m for m in module.modules() if isinstance(m, LocalNorm)]
        assert len(norms) == 2 * 4 + 1  # two per layer and the final norm
        assert all(p.sequence_parallel is sp for n in norms for p in n.parameters())
        if weights is None:
            weights = {k: v.clone() for k, v in module.state_dict().items() if v is not None}
            assert all(n.weight.eq(0).all() for n in norms)  # zero-centred gamma starts at 0
        results[sp] = (
            _pretrain(chunks, optimizer, scheduler),
            _score(chunks),
            _sip_step(chunks, optimizer, scheduler),
        )
        assert module.config.sequence_parallel is sp  # generation restored it
        if sp:
            assert all(n.weight.ne(0).any() for n in norms)  # gamma trained
    (losses, grads), scoring, sip = results[False]
    (sp_losses, sp_grads), sp_scoring, sp_sip = results[True]
    tight = dict(atol=1e-5, rtol=1e-5)
    # Pretraining: per-step losses and grad norms, and every gradient (the norms' included:
    # each rank sees half the sequence, so theirs must be all-reduced over TP to match).
    torch.testing.assert_close(torch.tensor(sp_losses), torch.tensor(losses), **tight)
    assert grads.keys() == sp_grads.keys()
    for name in grads:
        torch.testing.assert_close(sp_grads[name], grads[name], **tight, msg=name)
    # Candidate scoring: odd lengths padded to a multiple of TP under SP only.
    assert scoring[0] % 2 == 1 and sp_scoring[0] == scoring[0] + 1
    torch.testing.assert_close(sp_scoring[1], scoring[1], **tight)
    for name in scoring[2]:
        torch.testing.assert_close(sp_scoring[2][name], scoring[2][name], **tight, msg=name)
    # SIP step: the same rollouts (decoded without SP), losses and gradients.
    assert torch.equal(sp_sip[0], sip[0])
    assert sp_sip[1] % 2 == 0
    assert sp_sip[2].keys() == sip[2].keys() and "dpo loss" in sip[2]
    for name in sip[2]:
        torch.testing.assert_close(sp_sip[2][name], sip[2][name], **tight, msg=name)
    torch.testing.assert_close(sp_sip[3], sip[3], **tight)
    for name in sip[4]:
        torch.testing.assert_close(sp_sip[4][name], sip[4][name], **tight, msg=name)
    destroy_distributed()


def test_sequence_parallel_matches_tensor_parallel():
    run_ranks(sequence_parallel_worker, 2)
