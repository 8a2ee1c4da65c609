"""Choosing the (chosen, rejected) pair of a prefix from its candidates' rewards (METHOD step 5).

The pool is the original suffix, the rewrite and the K rollouts. Chosen: the highest reward, ties
preferring original, then rewrite, then the earliest rollout. Rejected: the lowest-reward rollout
(the earliest on ties) other than the chosen one. With the curriculum, rollouts are left out of the
chosen pool before ``--sip-rollout-warmup-iters`` or while their mean reward is below the
rewrite's, and later enter it only when they beat the rewrite by ``--sip-rollout-margin``. A
candidate whose reward is missing takes no part. A pair whose reward gap is below
``--sip-min-reward-gap`` is skipped, with the reason counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

from megatron_sip.training.sip.config import SIPConfig

ORIGINAL, REWRITE, ROLLOUT = "original", "rewrite", "rollout"
_TIE_ORDER = {ORIGINAL: 0, REWRITE: 1, ROLLOUT: 2}


@dataclasses.dataclass(frozen=True)
class Candidate:
    kind: str  # original, rewrite or rollout
    index: int  # rollout index (0 for original and rewrite)


@dataclasses.dataclass(frozen=True)
class Selection:
    chosen: Optional[Candidate]
    rejected: Optional[Candidate]
    skipped: Optional[str] = None  # why no pair was formed: no_chosen, no_rejected, small_gap
    gap: Optional[float] = None


def rollouts_allowed(
    iteration: int, rewrite: Optional[float], rollouts: Sequence[Optional[float]], sip: SIPConfig
) -> bool:
    """Whether, under the curriculum, rollouts may be chosen at this step."""
    if not sip.sip_curriculum:
        return True
    if iteration < sip.sip_rollout_warmup_iters:
        return False
    known = [r for r in rollouts if r is not None]
    if rewrite is not None and known and sum(known) / len(known) < rewrite:
        return False
    return True


def select_pair(
    original: Optional[float],
    rewrite: Optional[float],
    rollouts: Sequence[Optional[float]],
    *,
    iteration: int,
    sip: SIPConfig,
    need_rejected: bool = True,
) -> Selection:
    pool: list[tuple[float, Candidate]] = []
    if original is not None:
        pool.append((original, Candidate(ORIGINAL, 0)))
    if rewrite is not None:
        pool.append((rewrite, Candidate(REWRITE, 0)))
    if rollouts_allowed(iteration, rewrite, rollouts, sip):
        bar = None
        if sip.sip_curriculum and rewrite is not None:
            bar = rewrite + sip.sip_rollout_margin
        for index, reward in enumerate(rollouts):
            if reward is not None and (bar is None or reward >= bar):
                pool.append((reward, Candidate(ROLLOUT, index)))
    if not pool:
        return Selection(None, None, skipped="no_chosen")
    best_reward, chosen = max(
        pool, key=lambda item: (item[0], -_TIE_ORDER[item[1].kind], -item[1].index)
    )
    if not need_rejected:
        return Selection(chosen, None)
    rejectable = [
        (reward, Candidate(ROLLOUT, index))
        for index, reward in enumerate(rollouts)
        if reward is not None and not (chosen.kind == ROLLOUT and chosen.index == index)
    ]
    if not rejectable:
        return Selection(chosen, None, skipped="no_rejected")
    worst_reward, rejected = min(rejectable, key=lambda item: (item[0], item[1].index))
    gap = best_reward - worst_reward
    if gap < sip.sip_min_reward_gap or gap <= 0:
        return Selection(chosen, rejected, skipped="small_gap", gap=gap)
    return Selection(chosen, rejected, gap=gap)
