"""From a step's (prefix, suffix) samples to scored candidates and the chosen/rejected pairs
(METHOD steps 2 to 5): :meth:`CandidateCollector.collect` composes one module per arrow,

    rewrites.py (rewrite) + rollouts.py (K rollouts) + the original
      -> judging.py (scores, through the score store) -> rewards.py -> the objective's selection.

Every rank of a model-parallel group sees the same samples and ends with the same candidates:
the rollout engine returns the same tokens on every rank, and a role that is not collective is
called on the group's first rank with its answers broadcast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

from megatron_sip.data.sip_dataset import SIPSample
from megatron_sip.data.tokenizers import decode_continuation
from megatron_sip.training.sip.config import SIPConfig
from megatron_sip.training.sip.judging import CandidateJudge, CandidateTexts, Scores, unjudged
from megatron_sip.training.sip.objectives import Objective
from megatron_sip.training.sip.rewards import CandidateRewards, RewardConfig, candidate_rewards
from megatron_sip.training.sip.rewrites import RewriteSource, sample_texts
from megatron_sip.training.sip.rollouts import PrefixRollouts, RolloutSampler
from megatron_sip.training.sip.score_store import ScoreStore
from megatron_sip.training.sip.selection import ORIGINAL, REWRITE, Candidate, Selection
from megatron_sip.training.timers import PhaseTimes


@dataclasses.dataclass
class ScoredSample:
    """One prefix with its candidates, their per-objective scores and rewards, and the pair."""

    sample: SIPSample
    prefix: list[int]
    original: list[int]
    rewrite: Optional[list[int]]  # None: the rewrite is missing
    rollouts: list[list[int]]  # K token lists, cut after the first EOD
    rollout_log_probs: list[float]  # each rollout's log-prob under its sampling distribution
    scores: Scores  # kind -> one {objective: score} per candidate
    rewards: CandidateRewards
    selection: Optional[Selection] = None  # the objective's pick

    def tokens(self, candidate: Candidate) -> list[int]:
        if candidate.kind == ORIGINAL:
            return self.original
        if candidate.kind == REWRITE:
            return self.rewrite
        return self.rollouts[candidate.index]


@dataclasses.dataclass
class CandidateCollector:
    objective: Objective
    sip: SIPConfig
    reward: RewardConfig
    tokenizer: object
    rewrites: RewriteSource
    rollouts: Optional[RolloutSampler] = None  # objectives that need rollouts
    judging: Optional[CandidateJudge] = None  # objectives that need a judge

    def collect(
        self,
        micro_batches: Sequence[Sequence[SIPSample]],
        *,
        iteration: int,
        seed: int,
        data_parallel_rank: int,
        store: ScoreStore,
        times: PhaseTimes,
    ) -> list[list[ScoredSample]]:
        """Candidates, scores and pairs for every sample of this rank's micro-batches."""
        samples = [sample for batch in micro_batches for sample in batch]
        texts = [sample_texts(self.tokenizer, sample) for sample in samples]
        with times.phase("rewrite") as timer:
            rewrites = self.rewrites.rewrites(samples, texts)
            timer.tokens = sum(len(r) for r in rewrites if r is not None)
        rollouts = [PrefixRollouts([], []) for _ in samples]
        if self.objective.needs_rollouts:
            with times.phase("rollout") as timer:
                rollouts = self.rollouts.sample(
                    [[s.prefix.tolist() for s in batch] for batch in micro_batches],
                    seed=seed,
                    iteration=iteration,
                    data_parallel_rank=data_parallel_rank,
                )
                timer.tokens = sum(len(t) for r in rollouts for t in r.tokens)
        candidates = [
            self._texts(sample, text, rewrite, rollout)
            for sample, text, rewrite, rollout in zip(samples, texts, rewrites, rollouts)
        ]
        scores = unjudged(candidates)
        if self.objective.needs_judge:
            with times.phase("judge") as timer:
                scores = self.judging.score(candidates, [s.key for s in samples], store)
                timer.tokens = sum(len(s.suffix) for s in samples)
                timer.tokens += sum(len(r) for r in rewrites if r is not None)
                timer.tokens += sum(len(t) for r in rollouts for t in r.tokens)
        scored = [
            ScoredSample(
                sample=sample,
                prefix=sample.prefix.tolist(),
                original=sample.suffix.tolist(),
                rewrite=rewrite,
                rollouts=rollout.tokens,
                rollout_log_probs=rollout.log_probs,
                scores=score,
                rewards=candidate_rewards(score, self.reward),
            )
            for sample, rewrite, rollout, score in zip(samples, rewrites, rollouts, scores)
        ]
        for sample in scored:
            sample.selection = self.objective.select(sample, iteration=iteration, sip=self.sip)
        return _regroup(scored, micro_batches)

    def _texts(self, sample, texts, rewrite, rollouts: PrefixRollouts) -> CandidateTexts:
        prefix = sample.prefix.tolist()

        def decode(tokens):
            return decode_continuation(self.tokenizer, prefix, tokens)

        return CandidateTexts(
            prefix=texts[0],
            original=texts[1],
            rewrite=None if rewrite is None else decode(rewrite),
            rollouts=[decode(tokens) for tokens in rollouts.tokens],
        )


def _regroup(items: list, micro_batches: Sequence[Sequence]) -> list[list]:
    out, start = [], 0
    for batch in micro_batches:
        out.append(items[start : start + len(batch)])
        start += len(batch)
    return out
