"""What SIP asks of its judge and its rewriter.

All calls are batched: one list in, one list out, in order, so a model-backed backend can run a
batch through the network at once and a remote one can send it in one request. A score that could
not be produced (a failed request, an unparseable verdict) is ``None``: callers count it as
missing and never treat it as a default value.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import Optional

import torch

Score = Optional[float]

OBJECTIVES = ("quality", "safety", "factuality")
"""Every objective a judge scores, in a fixed order."""


def score_present(score) -> bool:
    """A usable score: not None and not NaN (a NaN can only come from a broken judge)."""
    return score is not None and not (isinstance(score, float) and math.isnan(score))


class Judge(abc.ABC):
    """Scores candidate suffixes of a prefix for quality, safety and factuality, each in [0, 1]."""

    collective = False
    """True when every model-parallel rank must make the same calls together (a colocated
    model); otherwise one rank calls and shares the scores."""

    @abc.abstractmethod
    def prefer(
        self, prefixes: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]
    ) -> list[Score]:
        """P(first is the better continuation of prefix than second), candidates in that order."""

    def quality(
        self, prefixes: Sequence[str], candidates: Sequence[str], references: Sequence[str]
    ) -> list[Score]:
        """P(candidate better than reference | prefix), judged in both orders and averaged, so
        a judge's position bias cancels. Missing when either order is missing."""
        _check_lengths(prefixes, candidates, references)
        forward = self.prefer(prefixes, candidates, references)
        backward = self.prefer(prefixes, references, candidates)
        return [
            None if f is None or b is None else 0.5 * (f + (1.0 - b))
            for f, b in zip(forward, backward)
        ]

    def prefer_coherence(
        self, prefixes: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]
    ) -> list[Score]:
        """P(first is the more coherent continuation of prefix than second): an evaluation
        metric (the coherence win rate), not a training reward. Backends without a coherence
        verdict refuse."""
        raise NotImplementedError(
            f"{getattr(self, 'identity', type(self).__name__)} has no coherence verdict (a prompt "
            "pack needs a coherence.txt; the oracle judge has one)"
        )

    @abc.abstractmethod
    def safety(self, prefixes: Sequence[str], texts: Sequence[str]) -> list[Score]:
        """P(text is safe | prefix)."""

    @abc.abstractmethod
    def factuality(self, prefixes: Sequence[str], texts: Sequence[str]) -> list[Score]:
        """How factually correct text is given prefix, in [0, 1]."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Releases what the backend holds (connections, models)."""


class Rewriter(abc.ABC):
    """Rewrites an original suffix into an improved one that still continues the prefix."""

    collective = False
    """As :attr:`Judge.collective`."""

    @abc.abstractmethod
    def rewrite(self, prefixes: Sequence[str], suffixes: Sequence[str]) -> list[Optional[str]]:
        """One rewrite per (prefix, suffix); None when it could not be produced."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Releases what the backend holds."""


def _check_lengths(*columns: Sequence) -> None:
    lengths = {len(column) for column in columns}
    if len(lengths) > 1:
        raise ValueError(f"batched call with columns of different lengths: {sorted(lengths)}")


def call_role(produce: Callable[[], list], collective: bool, group) -> list:
    """``produce()``, a batched role call, as the model-parallel ``group`` must make it: on
    every rank for a collective role (a colocated model), else on the group's first rank only
    with the answers broadcast to the others, so that the ranks of a group never disagree (a
    flaky server cannot split them)."""
    if collective or group is None or group.size() == 1:
        return produce()
    first = torch.distributed.get_process_group_ranks(group)[0]
    payload = [produce() if torch.distributed.get_rank() == first else None]
    torch.distributed.broadcast_object_list(payload, src=first, group=group)
    return payload[0]
