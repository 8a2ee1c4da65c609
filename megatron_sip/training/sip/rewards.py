"""A candidate's SIP reward from its judge scores (METHOD step 4).

The reward of a candidate suffix is ``r(c) = sum_o w_o * J_o(c)`` over the enabled objectives
(``--sip-objectives``, ``--sip-objective-weights``). A candidate with any enabled objective's score
missing has no reward (``None``): a missing score is never replaced by a default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Optional

from megatron_sip.errors import ConfigError
from megatron_sip.roles.base import OBJECTIVES, Score, score_present

ObjectiveScores = dict[str, Score]
"""One candidate's judge scores: objective name -> score in [0, 1], or None when missing."""


@dataclasses.dataclass
class RewardConfig:
    """How judge scores are combined into one reward per candidate."""

    sip_objectives: str = "quality"
    """Comma-separated objectives the judge scores and the reward combines: any of quality,
    safety, factuality (e.g. quality,safety,factuality)."""

    sip_objective_weights: Optional[str] = None
    """Comma-separated non-negative weights, one per --sip-objectives entry in the same order;
    reward = sum of weight * score. Default: equal weights 1/number of objectives."""

    def __post_init__(self):
        self._objectives = _parse_objectives(self.sip_objectives)
        self._weights = _parse_weights(self.sip_objective_weights, self._objectives)

    @property
    def objectives(self) -> tuple[str, ...]:
        """The enabled objectives, in the order given."""
        return self._objectives

    def weights(self) -> dict[str, float]:
        """Enabled objective -> its weight."""
        return dict(zip(self._objectives, self._weights))

    def reward(self, scores: Mapping[str, Score]) -> Score:
        """:func:`weighted_reward` of one candidate with these weights."""
        return weighted_reward(scores, self.weights())


def _parse_objectives(text: str) -> tuple[str, ...]:
    flag = "--sip-objectives"
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(flag, f"need at least one of {', '.join(OBJECTIVES)}, got {text!r}")
    names = tuple(part.strip() for part in text.split(","))
    for name in names:
        if name not in OBJECTIVES:
            raise ConfigError(
                flag, f"unknown objective {name!r} in {text!r}; choose from {', '.join(OBJECTIVES)}"
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(flag, f"objective listed more than once: {', '.join(duplicates)}")
    return names


def _parse_weights(text: Optional[str], objectives: tuple[str, ...]) -> tuple[float, ...]:
    flag = "--sip-objective-weights"
    if text is None:
        return tuple(1.0 / len(objectives) for _ in objectives)
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) != len(objectives):
        raise ConfigError(
            flag,
            f"got {len(parts)} weight(s) ({text!r}) for {len(objectives)} objective(s) "
            f"({', '.join(objectives)}); give one weight per --sip-objectives entry",
        )
    weights = []
    for part in parts:
        try:
            weight = float(part)
        except ValueError:
            raise ConfigError(flag, f"{part!r} is not a number (in {text!r})") from None
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(flag, f"weights must be finite and >= 0, got {part!r} in {text!r}")
        weights.append(weight)
    if sum(weights) <= 0:
        raise ConfigError(flag, f"at least one weight must be positive, got {text!r}")
    return tuple(weights)


def weighted_reward(scores: Mapping[str, Score], weights: Mapping[str, float]) -> Score:
    """``sum_o weights[o] * scores[o]`` over the objectives in ``weights`` (the enabled ones).

    None when any enabled objective's score is missing (absent, None or NaN), even one whose
    weight is 0: a missing score means the judge failed on this candidate, and no value is made
    up for it. Scores of objectives that are not enabled are ignored.
    """
    total = 0.0
    for objective, weight in weights.items():
        score = scores.get(objective)
        if not score_present(score):
            return None
        total += float(weight) * float(score)
    return total


def weighted_rewards(
    candidates: Sequence[Mapping[str, Score]], weights: Mapping[str, float]
) -> list[Score]:
    """:func:`weighted_reward` of each candidate, in order."""
    return [weighted_reward(scores, weights) for scores in candidates]


def scores_from_columns(columns: Mapping[str, Sequence[Score]]) -> list[ObjectiveScores]:
    """Per-objective score lists (as the batched :class:`~megatron_sip.roles.base.Judge` calls
    return them) -> one :data:`ObjectiveScores` per candidate."""
    lengths = {len(column) for column in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"score columns of different lengths: {sorted(lengths)}")
    count = lengths.pop() if lengths else 0
    return [{objective: column[i] for objective, column in columns.items()} for i in range(count)]


@dataclasses.dataclass(frozen=True)
class CandidateRewards:
    """One prefix's candidate rewards; None where the candidate or a score of it is missing."""

    original: Score
    rewrite: Score
    rollouts: tuple[Score, ...]

    def by_kind(self) -> dict[str, list[Score]]:
        return {
            "original": [self.original],
            "rewrite": [self.rewrite],
            "rollout": list(self.rollouts),
        }


def candidate_rewards(
    scores: Mapping[str, Sequence[Mapping[str, Score]]], config: RewardConfig
) -> CandidateRewards:
    """Rewards of one prefix's candidates from their scores ``{kind: [ObjectiveScores]}``."""
    weights = config.weights()

    def first(kind: str) -> Score:
        return weighted_reward(scores[kind][0], weights) if scores[kind] else None

    return CandidateRewards(
        first("original"), first("rewrite"), tuple(weighted_rewards(scores["rollout"], weights))
    )
