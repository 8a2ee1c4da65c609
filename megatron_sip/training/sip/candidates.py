"""From a step's (prefix, suffix) samples to scored candidates and the chosen/rejected pairs
(METHOD steps 2 to 5): rewrite, K rollouts, judge, reward, select.

Every rank of a model-parallel group sees the same samples and must end with the same
candidates: the rollout engine returns the same tokens on every rank, colocated roles run as
collectives, and a role that is not collective (rules, a remote server) is called on the group's
first rank only and its answers are broadcast, so a flaky server cannot split the group.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_sip.data.sip_dataset import SIPSample
from megatron_sip.inference.generation import generate
from megatron_sip.inference.sampling import SamplingConfig
from megatron_sip.roles.base import Judge, Rewriter, Score
from megatron_sip.roles.rewards import RewardConfig, ScoreStore
from megatron_sip.roles.rewrite_store import RewriteStore
from megatron_sip.training.sip.config import SIPConfig
from megatron_sip.training.sip.selection import (
    ORIGINAL,
    REWRITE,
    ROLLOUT,
    Candidate,
    Selection,
    select_pair,
)

KINDS = (ORIGINAL, REWRITE, ROLLOUT)


@dataclasses.dataclass
class ScoredSample:
    """One prefix with its candidates, their per-objective scores and rewards, and the pair."""

    sample: SIPSample
    prefix: list[int]
    original: list[int]
    rewrite: Optional[list[int]]  # None: the rewrite is missing
    rollouts: list[list[int]]  # K token lists, cut after the first EOD
    scores: dict[str, list[dict[str, Score]]]  # kind -> one {objective: score} per candidate
    rewards: dict[str, list[Score]]  # kind -> one reward per candidate
    selection: Selection

    def tokens(self, candidate: Candidate) -> list[int]:
        if candidate.kind == ORIGINAL:
            return self.original
        if candidate.kind == REWRITE:
            return self.rewrite
        return self.rollouts[candidate.index]


@dataclasses.dataclass
class PhaseTimes:
    """Seconds and tokens processed per phase of a step."""

    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    tokens: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, phase: str, seconds: float, tokens: int = 0) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.tokens[phase] = self.tokens.get(phase, 0) + tokens


def synchronize() -> None:
    """Waits for queued device work so phase timings mean something on GPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseTimer:
    def __init__(self, times: PhaseTimes, phase: str):
        self.times, self.phase, self.tokens = times, phase, 0

    def __enter__(self) -> PhaseTimer:
        synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize()
        self.times.add(self.phase, time.perf_counter() - self.start, self.tokens)


def _share_from_first_rank(produce: Callable[[], list], collective: bool) -> list:
    """``produce()`` on every rank (collective roles) or on the model-parallel group's first
    rank only, with the result broadcast to the group."""
    if collective or not torch.distributed.is_initialized():
        return produce()
    group = parallel_state.get_model_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return produce()
    first = torch.distributed.get_process_group_ranks(group)[0]
    payload = [produce() if torch.distributed.get_rank() == first else None]
    torch.distributed.broadcast_object_list(payload, src=first, group=group)
    return payload[0]


@dataclasses.dataclass
class CandidateSources:
    """Where a step's candidates and scores come from."""

    policy: object  # the policy's model chunk (rollouts)
    tokenizer: object
    vocab_size: int  # the tokenizer's, unpadded: sampling never draws padding ids
    sip: SIPConfig
    sampling: SamplingConfig
    reward: RewardConfig
    suffix_len: int
    judge: Optional[Judge]
    judge_identity: str
    score_store: ScoreStore
    rewriter: Optional[Rewriter] = None
    rewrite_store: Optional[RewriteStore] = None


def rollout_seed(seed: int, iteration: int, data_parallel_rank: int, micro_batch: int) -> int:
    """The rollouts' sampling seed: a pure function of the step's position, so an interrupted
    and resumed run samples exactly what the uninterrupted one did."""
    return (seed * 1_000_003 + iteration * 7919 + data_parallel_rank * 131 + micro_batch) % 2**62


class CandidateCollector:
    def __init__(self, sources: CandidateSources):
        self.s = sources
        self.needs_rollouts = sources.sip.sip_loss != "sft_rewrite"

    # ---- rewrite -------------------------------------------------------------------------

    def _encode_rewrite(self, text: Optional[str]) -> Optional[list[int]]:
        if text is None:
            return None
        tokens = self.s.tokenizer.tokenize(text)[: self.s.suffix_len]
        # An empty rewrite means "the text should end here".
        return tokens or [self.s.tokenizer.eod]

    def rewrites(
        self, samples: Sequence[SIPSample], prefixes: list[str], suffixes: list[str]
    ) -> list[Optional[list[int]]]:
        if self.s.rewrite_store is not None:
            texts = [self.s.rewrite_store.get(sample.key) for sample in samples]
        else:
            rewriter = self.s.rewriter
            texts = _share_from_first_rank(
                lambda: rewriter.rewrite(prefixes, suffixes), rewriter.collective
            )
        return [self._encode_rewrite(text) for text in texts]

    # ---- judge ---------------------------------------------------------------------------

    def _judge_all(
        self,
        prefixes: list[str],
        originals: list[str],
        texts: dict[str, list[list[Optional[str]]]],
        keys: list[tuple],
    ) -> dict[str, list[list[dict[str, Score]]]]:
        """Scores ``texts[kind][sample][candidate]`` (None text: no candidate, no score) for
        every enabled objective, original and rewrite through the score store."""
        judge, store, identity = self.s.judge, self.s.score_store, self.s.judge_identity
        scores = {kind: [[{} for _ in per_sample] for per_sample in texts[kind]] for kind in KINDS}
        for objective in self.s.reward.objectives:
            pending = []  # (kind, sample, candidate, text)
            for kind in KINDS:
                for i, per_sample in enumerate(texts[kind]):
                    for j, text in enumerate(per_sample):
                        if text is None:
                            scores[kind][i][j][objective] = None
                            continue
                        if objective == "quality" and kind == ORIGINAL:
                            # The original against itself: a tie by definition.
                            scores[kind][i][j][objective] = 0.5
                            continue
                        if kind in (ORIGINAL, REWRITE):
                            cached = store.get(keys[i], kind, objective, identity)
                            if cached is not None:
                                scores[kind][i][j][objective] = cached
                                continue
                        pending.append((kind, i, j, text))
            batch_prefixes = [prefixes[i] for _, i, _, _ in pending]
            batch_texts = [text for *_, text in pending]

            references = [originals[i] for _, i, _, _ in pending]

            def call(objective=objective, batch_prefixes=batch_prefixes, batch_texts=batch_texts,
                     references=references):  # fmt: skip
                if not batch_texts:
                    return []
                if objective == "quality":
                    return judge.quality(batch_prefixes, batch_texts, references)
                return getattr(judge, objective)(batch_prefixes, batch_texts)

            results = _share_from_first_rank(call, judge.collective)
            for (kind, i, j, _), score in zip(pending, results):
                scores[kind][i][j][objective] = score
                if kind in (ORIGINAL, REWRITE):
                    store.put(keys[i], kind, objective, identity, score)
        return scores

    # ---- the step ------------------------------------------------------------------------

    def collect(
        self,
        micro_batches: Sequence[Sequence[SIPSample]],
        *,
        iteration: int,
        seed: int,
        data_parallel_rank: int,
        times: PhaseTimes,
    ) -> list[list[ScoredSample]]:
        """Candidates, scores and pairs for every sample of this rank's micro-batches."""
        tokenizer, sip = self.s.tokenizer, self.s.sip
        samples = [sample for batch in micro_batches for sample in batch]
        prefixes = [sample.prefix.tolist() for sample in samples]
        originals = [sample.suffix.tolist() for sample in samples]
        prefix_texts = [tokenizer.detokenize(p) for p in prefixes]
        original_texts = [tokenizer.detokenize(o) for o in originals]

        with PhaseTimer(times, "rewrite") as timer:
            rewrites = self.rewrites(samples, prefix_texts, original_texts)
            timer.tokens = sum(len(r) for r in rewrites if r is not None)

        rollouts: list[list[list[int]]] = [[] for _ in samples]
        if self.needs_rollouts:
            with PhaseTimer(times, "rollout") as timer:
                start = 0
                for index, batch in enumerate(micro_batches):
                    generated = generate(
                        self.s.policy,
                        prefixes[start : start + len(batch)],
                        num_samples=sip.sip_num_rollouts,
                        num_tokens=self.s.suffix_len,
                        sampling=self.s.sampling,
                        seed=rollout_seed(seed, iteration, data_parallel_rank, index),
                        eod=tokenizer.eod,
                        vocab_size=self.s.vocab_size,
                    )
                    rollouts[start : start + len(batch)] = generated.as_candidates()
                    timer.tokens += int(generated.mask.sum())
                    start += len(batch)

        texts = {
            ORIGINAL: [[text] for text in original_texts],
            REWRITE: [[None if r is None else tokenizer.detokenize(r)] for r in rewrites],
            ROLLOUT: [[tokenizer.detokenize(r) for r in per_sample] for per_sample in rollouts],
        }
        if self.needs_rollouts:
            with PhaseTimer(times, "judge") as timer:
                scores = self._judge_all(
                    prefix_texts, original_texts, texts, [s.key for s in samples]
                )
                timer.tokens = sum(len(o) for o in originals) + sum(
                    len(r) for r in rewrites if r is not None
                )
                timer.tokens += sum(len(r) for per_sample in rollouts for r in per_sample)
        else:
            scores = {kind: [[{} for _ in t] for t in texts[kind]] for kind in KINDS}

        scored = []
        for i, sample in enumerate(samples):
            rewards = {
                kind: [self.s.reward.reward(s) if s else None for s in scores[kind][i]]
                for kind in KINDS
            }
            if sip.sip_loss == "sft_rewrite":
                chosen = Candidate(REWRITE, 0) if rewrites[i] is not None else None
                selection = Selection(chosen, None, skipped=None if chosen else "no_chosen")
            else:
                selection = select_pair(
                    rewards[ORIGINAL][0],
                    rewards[REWRITE][0],
                    rewards[ROLLOUT],
                    iteration=iteration,
                    sip=sip,
                    need_rejected=sip.sip_loss == "online_dpo",
                )
            scored.append(
                ScoredSample(
                    sample=sample,
                    prefix=prefixes[i],
                    original=originals[i],
                    rewrite=rewrites[i],
                    rollouts=rollouts[i],
                    scores={kind: scores[kind][i] for kind in KINDS},
                    rewards=rewards,
                    selection=selection,
                )
            )
        out, start = [], 0
        for batch in micro_batches:
            out.append(scored[start : start + len(batch)])
            start += len(batch)
        return out
