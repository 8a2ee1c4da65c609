"""The middle of a SIP step, fast: the candidate collector with a scripted judge, rewriter and
rollouts (who is compared with whom, the self-score, the score store, missing scores), and the
batch and loss assembly (column order, placeholder weights, the global-batch normalisation, the
KL estimate)."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_sip.data.sip_dataset import SIPSample
from megatron_sip.data.tokenizers import NullTokenizer
from megatron_sip.roles.base import Judge, Rewriter
from megatron_sip.training.sip.batches import (
    BatchBuilder,
    GlobalCounts,
    global_counts,
    sip_loss,
)
from megatron_sip.training.sip.candidates import CandidateCollector, ScoredSample
from megatron_sip.training.sip.config import SIPConfig
from megatron_sip.training.sip.judging import SELF_QUALITY, CandidateJudge
from megatron_sip.training.sip.objectives import OBJECTIVES
from megatron_sip.training.sip.rewards import CandidateRewards, RewardConfig
from megatron_sip.training.sip.rewrites import RewriteSource
from megatron_sip.training.sip.rollouts import PrefixRollouts
from megatron_sip.training.sip.score_store import ScoreStore
from megatron_sip.training.sip.selection import ORIGINAL, REWRITE, ROLLOUT, Candidate, Selection
from megatron_sip.training.timers import PhaseTimes

VOCAB = 64
TOKENIZER = NullTokenizer(VOCAB - 1)  # vocabulary VOCAB, EOD VOCAB - 1; text is the ids


def sample(document: int, prefix, suffix) -> SIPSample:
    return SIPSample(np.array(prefix), np.array(suffix), 0, document, len(prefix))


def words(text: str) -> tuple[int, ...]:
    return tuple(int(w) for w in text.split())


class ScriptedJudge(Judge):
    """Scores from the candidate's first id; records every call. Ids listed in ``missing`` get
    no score (a failed request)."""

    def __init__(self, missing=()):
        self.calls: list[tuple] = []
        self.missing = set(missing)

    def _score(self, text: str) -> float | None:
        first = words(text)[0]
        return None if first in self.missing else first / VOCAB

    def prefer(self, prefixes, firsts, seconds):
        self.calls.append(("prefer", [words(a) for a in firsts], [words(b) for b in seconds]))
        out = []
        for a, b in zip(firsts, seconds):
            sa, sb = self._score(a), self._score(b)
            out.append(None if sa is None or sb is None else 1 / (1 + math.exp(sb - sa)))
        return out

    def safety(self, prefixes, texts):
        self.calls.append(("safety", [words(t) for t in texts]))
        return [self._score(t) for t in texts]

    def factuality(self, prefixes, texts):
        self.calls.append(("factuality", [words(t) for t in texts]))
        return [1.0 for _ in texts]


class ScriptedRewriter(Rewriter):
    """Rewrites by adding 1 to every id; a suffix starting with 13 has no rewrite."""

    def __init__(self):
        self.calls = 0

    def rewrite(self, prefixes, suffixes):
        self.calls += 1
        return [
            None if words(s)[0] == 13 else " ".join(str(i + 1) for i in words(s)) for s in suffixes
        ]


class ScriptedRollouts:
    def __init__(self, rollouts):
        self.rollouts = rollouts  # per sample: K token lists

    def sample(self, micro_batches, *, seed, iteration, data_parallel_rank):
        return [PrefixRollouts(r, [-float(len(t)) for t in r]) for r in self.rollouts]


def collector(objective="online_dpo", rollouts=(), judge=None, objectives="quality,safety"):
    return CandidateCollector(
        objective=OBJECTIVES[objective],
        sip=SIPConfig(sip_loss=objective),
        reward=RewardConfig(sip_objectives=objectives),
        tokenizer=TOKENIZER,
        rewrites=RewriteSource(TOKENIZER, 8, rewriter=ScriptedRewriter()),
        rollouts=ScriptedRollouts(list(rollouts)),
        judging=CandidateJudge(judge, RewardConfig(sip_objectives=objectives).objectives, "j1")
        if judge is not None
        else None,
    )


SAMPLES = [sample(1, [1, 2, 3], [10, 11, 12]), sample(2, [4, 5], [13, 14, 15])]
ROLLOUTS = [[[40, 41], [5, 6, 7]], [[50, 1], [30, 31, 32]]]


def collect(c, store, iteration=0, micro_batches=None):
    return c.collect(
        micro_batches or [SAMPLES],
        iteration=iteration,
        seed=1,
        data_parallel_rank=0,
        store=store,
        times=PhaseTimes(),
    )


def test_collector_judges_each_candidate_against_the_original():
    judge, store = ScriptedJudge(), ScoreStore()
    (scored,) = collect(collector(rollouts=ROLLOUTS, judge=judge), store)
    first, second = scored
    # Rewrites are tokenized after the prefix; the second sample's rewriter gave none.
    assert first.rewrite == [11, 12, 13] and second.rewrite is None
    assert first.rollouts == [[40, 41], [5, 6, 7]]
    # Quality: every candidate but the original against its own sample's original, both orders.
    forward, backward = [c for c in judge.calls if c[0] == "prefer"]
    candidates = [(11, 12, 13), (40, 41), (5, 6, 7), (50, 1), (30, 31, 32)]
    originals = [(10, 11, 12)] * 3 + [(13, 14, 15)] * 2
    assert sorted(zip(forward[1], forward[2])) == sorted(zip(candidates, originals))
    assert backward[1] == forward[2] and backward[2] == forward[1]
    # The original is never sent for quality: its self-score is a tie by definition.
    assert first.scores[ORIGINAL][0]["quality"] == SELF_QUALITY
    # Safety: every candidate, the originals included, in one batched call.
    (safety,) = [c for c in judge.calls if c[0] == "safety"]
    assert sorted(safety[1]) == sorted([(10, 11, 12), (13, 14, 15), *candidates])
    # Rewards: equal-weight quality and safety; selection by reward, rejected = worst rollout.
    assert first.rewards.original == pytest.approx(0.5 * (SELF_QUALITY + 10 / VOCAB))
    assert first.selection == Selection(
        Candidate(ROLLOUT, 0), Candidate(ROLLOUT, 1), gap=pytest.approx(
            first.rewards.rollouts[0] - first.rewards.rollouts[1]
        )
    )  # fmt: skip
    assert first.rewards.rollouts[0] > first.rewards.original > first.rewards.rollouts[1]
    assert second.rewards.rewrite is None and second.scores[REWRITE][0] == {
        "quality": None,
        "safety": None,
    }


def test_score_store_answers_for_original_and_rewrite_only():
    judge, store = ScriptedJudge(), ScoreStore()
    c = collector(rollouts=ROLLOUTS, judge=judge)
    collect(c, store)
    # Original and rewrite of each sample, per objective (the original's quality is never
    # judged, and the missing rewrite has no score to store).
    assert len(store) == 2 + 1 + 1 + 0  # safety x 2 originals, rewrite quality + safety
    misses = store.misses
    judge.calls.clear()
    (again,) = collect(c, store, iteration=1)
    assert store.hits == 4 and store.misses == misses  # every stored score answered
    (safety,) = [call for call in judge.calls if call[0] == "safety"]
    assert (10, 11, 12) not in safety[1] and (11, 12, 13) not in safety[1]  # cached
    assert sorted(safety[1]) == sorted([(40, 41), (5, 6, 7), (50, 1), (30, 31, 32)])
    # Another judge's identity never answers for this one.
    other = CandidateJudge(ScriptedJudge(), ("safety",), "j2")
    other.score([], [], store)
    assert store.get((0, 1, 3), ORIGINAL, "safety", "j2") is None


def test_missing_scores_stay_missing():
    judge, store = ScriptedJudge(missing={40}), ScoreStore()
    (scored,) = collect(collector(rollouts=ROLLOUTS, judge=judge), store)
    first = scored[0]
    assert first.scores[ROLLOUT][0] == {"quality": None, "safety": None}
    assert first.rewards.rollouts[0] is None
    # The unscored rollout is neither chosen nor rejected.
    assert first.selection.chosen != Candidate(ROLLOUT, 0)
    assert first.selection.rejected != Candidate(ROLLOUT, 0)
    missing = ScriptedJudge(missing={10})
    store = ScoreStore()
    collect(collector(rollouts=ROLLOUTS, judge=missing), store)
    assert (((0, 1, 3), ORIGINAL, "safety", "j1")) not in store  # a failure is not cached


def test_sft_rewrite_builds_no_rollouts_and_no_judge():
    (scored,) = collect(collector("sft_rewrite"), ScoreStore())
    first, second = scored
    assert first.rollouts == [] and first.scores[ORIGINAL] == [{}]
    assert first.selection == Selection(Candidate(REWRITE, 0), None)
    assert second.selection.skipped == "no_chosen"


# ---- batches and losses ------------------------------------------------------------------------


def scored_sample(prefix, original, rollouts, selection, rewrite=None, log_probs=None):
    return ScoredSample(
        sample=sample(0, prefix, original),
        prefix=list(prefix),
        original=list(original),
        rewrite=rewrite,
        rollouts=rollouts,
        rollout_log_probs=log_probs or [0.0] * len(rollouts),
        scores={},
        rewards=CandidateRewards(None, None, ()),
        selection=selection,
    )


# Attention-free stand-in: packing needs no model, only its config (no sequence parallelism).
MODEL = torch.nn.Module()
MODEL.config = types.SimpleNamespace(tensor_model_parallel_size=1, sequence_parallel=False)
PAIR = Selection(Candidate(ROLLOUT, 1), Candidate(ROLLOUT, 0), gap=0.5)
SKIPPED = Selection(Candidate(ORIGINAL, 0), Candidate(ROLLOUT, 0), skipped="small_gap")


def test_columns_are_chosen_then_rejected_and_skipped_pairs_weigh_zero():
    builder = BatchBuilder(OBJECTIVES["online_dpo"], SIPConfig(sip_nll_weight=0.5), pad_id=0)
    good = scored_sample([1, 2], [3, 4], [[5, 6], [7, 8, 9]], PAIR)
    skipped = scored_sample([1], [3, 4, 5], [[6], [7]], SKIPPED)
    (batch,), length, _ = builder.build(MODEL, [[good, skipped]])
    targets, mask = batch.packed.targets, batch.packed.mask.bool()
    # Column 0 is the chosen rollout 1, column 1 the rejected rollout 0, then the original.
    assert targets[0, 0][mask[0, 0]].tolist() == [7, 8, 9]
    assert targets[0, 1][mask[0, 1]].tolist() == [5, 6]
    assert targets[0, 2][mask[0, 2]].tolist() == [3, 4]
    assert batch.weights.tolist() == [1.0, 0.0]
    # A skipped pair keeps placeholders (its original) so the rows line up.
    assert targets[1, 0][mask[1, 0]].tolist() == [3, 4, 5]
    assert batch.lengths.tolist() == [[3, 2, 2], [3, 3, 3]]


def _logits(batch, seed):
    rows, length = batch.packed.tokens.shape
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, length, VOCAB, generator=generator).requires_grad_()


def _sequence_log_probs(logits, packed):
    """Per-candidate sums by plain log_softmax: the yardstick."""
    rows, columns, n = packed.targets.shape
    index = packed.predict_from.view(rows, -1)
    picked = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1])).log_softmax(-1)
    values = picked.gather(-1, packed.targets.view(rows, -1, 1))[..., 0].view(rows, columns, n)
    return (values * packed.mask).sum(-1)


def test_dpo_gradient_raises_the_chosen_and_lowers_the_rejected():
    objective, sip = OBJECTIVES["online_dpo"], SIPConfig()
    builder = BatchBuilder(objective, sip, pad_id=0)
    good = scored_sample([1, 2], [3, 4], [[5, 6], [7, 8]], PAIR)
    (batch,), _, _ = builder.build(MODEL, [[good]])
    batch.reference = torch.zeros(1, 2)
    logits = _logits(batch, 0)
    loss, count, _ = sip_loss(objective, sip, GlobalCounts(1, 0), None, batch, None, logits)
    loss.backward()
    rows = batch.packed.predict_from[0]
    chosen_grad = logits.grad[0, rows[0, 0], 7]  # the chosen rollout's first token
    rejected_grad = logits.grad[0, rows[1, 0], 5]  # the rejected rollout's first token
    assert count.item() == 1
    assert chosen_grad < 0 < rejected_grad  # descent raises the chosen, lowers the rejected


def test_loss_is_the_mean_over_the_global_batch_not_a_mean_of_means():
    """Micro-batch A holds 1 usable pair and a skipped one, B holds 3 pairs: Megatron's
    contract (sum of loss sums / sum of counts) gives the mean over the 4 pairs, plus the
    weighted NLL as a mean over all original tokens; a mean of per-micro-batch means would
    weigh A's pair 3x as much."""
    objective, sip = OBJECTIVES["online_dpo"], SIPConfig(sip_nll_weight=0.5, sip_dpo_beta=0.3)
    builder = BatchBuilder(objective, sip, pad_id=0)
    rollouts = [[5, 6], [7, 8, 9]]
    a = [
        scored_sample([1, 2], [3, 4], rollouts, PAIR),
        scored_sample([2], [3, 4, 5, 6], rollouts, SKIPPED),
    ]
    b = [scored_sample([1, 2, 3][: i + 1], [9] * (i + 2), rollouts, PAIR) for i in range(3)]
    batches, _, _ = builder.build(MODEL, [a, b])
    counts = global_counts(batches, objective, sip, None)
    assert counts == GlobalCounts(units=4, original_tokens=2 + 4 + 2 + 3 + 4)
    total, units, per_mb_means, dpo_terms, nll_terms = 0.0, 0, [], [], []
    logits = [_logits(batch, seed) for seed, batch in enumerate(batches)]
    for batch, z in zip(batches, logits):
        batch.reference = torch.randn(batch.weights.shape[0], 2)
        loss_sum, count, reports = sip_loss(objective, sip, counts, None, batch, None, z)
        total, units = total + loss_sum, units + count.item()
        per_mb_means.append(loss_sum.item() / count.item())
        # The yardstick, by hand.
        sequences = _sequence_log_probs(z, batch.packed)
        margins = (sequences[:, 0] - batch.reference[:, 0]) - (
            sequences[:, 1] - batch.reference[:, 1]
        )
        for weight, margin in zip(batch.weights, margins):
            if weight:
                dpo_terms.append(-F.logsigmoid(sip.sip_dpo_beta * margin))
        nll_terms.append(-sequences[:, 2].sum())
    expected = torch.stack(dpo_terms).mean() + sip.sip_nll_weight * torch.stack(nll_terms).sum() / (
        counts.original_tokens
    )
    assert units == 4
    torch.testing.assert_close(total / units, expected, rtol=1e-5, atol=1e-6)
    # The gradient Megatron applies (sum / global count) is the yardstick's.
    (total / units).backward()
    ours = [z.grad.clone() for z in logits]
    for z in logits:
        z.grad = None
    expected.backward()
    for a_grad, z in zip(ours, logits):
        torch.testing.assert_close(a_grad, z.grad, rtol=1e-5, atol=1e-7)
    # The old normalisation differs on this batch.
    assert abs(sum(per_mb_means) / 2 - expected.item()) > 1e-3


def test_without_usable_pairs_the_nll_term_alone_normalises():
    objective, sip = OBJECTIVES["online_dpo"], SIPConfig(sip_nll_weight=0.5)
    builder = BatchBuilder(objective, sip, pad_id=0)
    (batch,), _, _ = builder.build(MODEL, [[scored_sample([1], [3, 4], [[5], [6]], SKIPPED)]])
    batch.reference = torch.zeros(1, 2)
    counts = global_counts([batch], objective, sip, None)
    loss_sum, count, reports = sip_loss(
        objective, sip, counts, None, batch, None, _logits(batch, 1)
    )
    assert counts.units == 0 and count.item() == 2
    assert reports["dpo loss"].tolist() == [0.0, 0.0]
    nll = -_sequence_log_probs(_logits(batch, 1), batch.packed)[0, 2]
    torch.testing.assert_close(loss_sum / count, sip.sip_nll_weight * nll / 2)


def test_nll_objectives_average_over_tokens():
    objective, sip = OBJECTIVES["rf_nll"], SIPConfig(sip_loss="rf_nll")
    builder = BatchBuilder(objective, sip, pad_id=0)
    chosen = Selection(Candidate(ROLLOUT, 1), None)
    samples = [
        scored_sample([1], [3], [[5], [6, 7, 8]], chosen),
        scored_sample([2], [3], [[5, 6], [9]], Selection(None, None, skipped="no_chosen")),
    ]
    (batch,), _, _ = builder.build(MODEL, [samples])
    z = _logits(batch, 2)
    loss_sum, count, _ = sip_loss(objective, sip, GlobalCounts(3, 0), None, batch, None, z)
    assert count.item() == 3  # the chosen rollout's tokens; the skipped prefix adds none
    expected = -_sequence_log_probs(z, batch.packed)[0, 0]
    torch.testing.assert_close(loss_sum, expected)


def test_kl_estimate_on_the_probe_rollout():
    """The reference also scores rollout 0, a policy sample: log pi - log pi_ref on it."""
    objective, sip = OBJECTIVES["online_dpo"], SIPConfig()
    builder = BatchBuilder(objective, sip, pad_id=0, kl_probe=True)
    samples = [
        scored_sample([1, 2], [3], [[5, 6], [7]], PAIR, log_probs=[-2.0, -1.0]),
        scored_sample([2], [3], [[8], [9]], PAIR, log_probs=[-4.0, -3.0]),
    ]
    (batch,), _, reference_length = builder.build(MODEL, [samples])
    mask = batch.reference_packed.mask.bool()
    assert batch.reference_packed.targets[0, 2][mask[0, 2]].tolist() == [5, 6]  # the probe
    assert batch.probe_log_probs.tolist() == [-2.0, -4.0]
    batch.reference = torch.tensor([[0.0, 0.0, -2.5], [0.0, 0.0, -3.0]])
    *_, reports = sip_loss(objective, sip, GlobalCounts(2, 0), None, batch, None, _logits(batch, 3))
    total, rows = reports["kl rollouts"].tolist()
    assert (total, rows) == (pytest.approx((-2.0 + 2.5) + (-4.0 + 3.0)), 2.0)
