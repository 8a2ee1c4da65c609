"""Judging a step's candidates (METHOD step 4): every candidate of every prefix, per enabled
objective, in one batched judge call per objective.

- quality: each candidate against the original suffix, judged in both orders and averaged
  (``Judge.quality``); the original against itself is :data:`SELF_QUALITY` by definition, so it
  is never sent to the judge;
- safety, factuality: each candidate on its own, given the prefix.

Scores of the original and of the rewrite depend only on the data: they are looked up in the
score store first and stored after judging, so each is judged once per (sample, judge). A score
the judge could not give is None: it is never stored and never replaced by a default.

A judge that is not collective (rules, a remote server) is called on the model-parallel group's
first rank and its scores broadcast, so every rank of a group ends with the same scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

from megatron_sip.roles.base import Judge, Score, call_role, score_present
from megatron_sip.training.sip.score_store import ScoreStore
from megatron_sip.training.sip.selection import ORIGINAL, REWRITE, ROLLOUT

KINDS = (ORIGINAL, REWRITE, ROLLOUT)

SELF_QUALITY = 0.5
"""J_qual(original, original | prefix): the original compared with itself is a tie."""

CACHED_KINDS = (ORIGINAL, REWRITE)
"""Candidates whose scores depend only on the data (kept in the score store)."""


@dataclasses.dataclass
class CandidateTexts:
    """One prefix's candidates as text (each decoded after the prefix, as the policy reads it)."""

    prefix: str
    original: str
    rewrite: Optional[str]  # None: no rewrite
    rollouts: list[str]

    def of_kind(self, kind: str) -> list[Optional[str]]:
        if kind == ORIGINAL:
            return [self.original]
        if kind == REWRITE:
            return [self.rewrite]
        return list(self.rollouts)


Scores = dict[str, list[dict[str, Score]]]
"""One prefix's scores: kind -> one {objective: score} per candidate of that kind."""


@dataclasses.dataclass
class CandidateJudge:
    judge: Judge
    objectives: tuple[str, ...]  # the enabled objectives (--sip-objectives)
    identity: str  # what the judge's scores depend on: the score store's key
    group: object = None  # the model-parallel group (None: a world of one)
    asked: int = 0  # scores asked of the judge so far (not the cached or self-evident ones)
    missing: int = 0  # of those, the ones that came back missing

    def take_counts(self) -> tuple[int, int]:
        """(asked, missing) since the last call."""
        counts = (self.asked, self.missing)
        self.asked = self.missing = 0
        return counts

    def score(
        self, texts: Sequence[CandidateTexts], keys: Sequence[tuple], store: ScoreStore
    ) -> list[Scores]:
        """Scores of every candidate of every prefix (``keys``: the samples' store keys)."""
        scores: list[Scores] = [
            {kind: [{} for _ in candidates.of_kind(kind)] for kind in KINDS} for candidates in texts
        ]
        for objective in self.objectives:
            pending = []  # (prefix index, kind, candidate index, text)
            for i, candidates in enumerate(texts):
                for kind in KINDS:
                    for j, text in enumerate(candidates.of_kind(kind)):
                        known = self._known(objective, kind, text, keys[i], store)
                        if known is _UNKNOWN:
                            pending.append((i, kind, j, text))
                        else:
                            scores[i][kind][j][objective] = known
            results = call_role(
                lambda o=objective, p=pending: self._call(o, p, texts),
                self.judge.collective,
                self.group,
            )
            self.asked += len(pending)
            self.missing += sum(not score_present(score) for score in results)
            for (i, kind, j, _), score in zip(pending, results):
                scores[i][kind][j][objective] = score
                if kind in CACHED_KINDS:
                    store.put(keys[i], kind, objective, self.identity, score)
        return scores

    def _known(self, objective: str, kind: str, text, key, store: ScoreStore):
        """A score that needs no judge call, or _UNKNOWN."""
        if text is None:
            return None  # no candidate (a missing rewrite): no score
        if objective == "quality" and kind == ORIGINAL:
            return SELF_QUALITY
        if kind in CACHED_KINDS:
            cached = store.get(key, kind, objective, self.identity)
            if cached is not None:
                return cached
        return _UNKNOWN

    def _call(self, objective: str, pending: list, texts: Sequence[CandidateTexts]) -> list[Score]:
        if not pending:
            return []
        prefixes = [texts[i].prefix for i, *_ in pending]
        candidates = [text for *_, text in pending]
        if objective == "quality":
            return self.judge.quality(
                prefixes, candidates, [texts[i].original for i, *_ in pending]
            )
        return getattr(self.judge, objective)(prefixes, candidates)


_UNKNOWN = object()


def unjudged(texts: Sequence[CandidateTexts]) -> list[Scores]:
    """Empty scores for an objective that judges nothing (``sft_rewrite``)."""
    return [
        {kind: [{} for _ in candidates.of_kind(kind)] for kind in KINDS} for candidates in texts
    ]
