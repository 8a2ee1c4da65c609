"""A cache of the judge's scores that depend only on the data: the original suffix's and its
rewrite's (METHOD step 4). Training state: it is saved with a SIP checkpoint and restored on
resume.

:class:`ScoreStore` is keyed by the sample (``SIPSample.key``), the candidate kind, the objective
and the judge's identity. Its state is plain lists, so it can be saved with a checkpoint's common
state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

from megatron_sip.roles.base import OBJECTIVES, Score, score_present

KINDS = ("original", "rewrite")
"""Candidates whose scores depend only on the data, so they can be cached."""

SampleKey = tuple[int, int, int]  # (dataset, document, split_point), as SIPSample.key

_STATE_VERSION = 1


def judge_identity(*parts: Any) -> str:
    """A short stable id for what determines a judge's scores, hashed from ``parts`` (e.g. the
    backend name, the checkpoint path, a hash of the prompt directory). Each part is turned into
    ``str`` and length-prefixed, so ``("ab", "c")`` and ``("a", "bc")`` differ."""
    digest = hashlib.sha256()
    for part in parts:
        text = str(part).encode("utf-8")
        digest.update(f"{len(text)}:".encode())
        digest.update(text)
    return digest.hexdigest()[:32]


class ScoreStore:
    """Judge scores of the original suffix and of its rewrite, which depend only on the data.

    An entry is keyed by the sample (``SIPSample.key``: dataset, document, split point), the
    candidate kind (``original`` or ``rewrite``), the objective and the judge's identity
    (:func:`judge_identity`). The identity must cover everything that changes a score for the
    same key: the judge's backend, weights and prompts, and also what decides the candidate's
    text (data paths and split, ``--sip-suffix-len``, the tokenizer, and for rewrites the
    rewriter or the rewrite store). Scores from other judges stay in the store but never answer
    for this one.

    Missing scores (None, NaN) are never stored, so a failed judge call is retried later. With
    ``max_entries`` the oldest entries (by first insertion; overwriting keeps an entry's place)
    are evicted first.
    """

    def __init__(self, max_entries: Optional[int] = None):
        if max_entries is not None and max_entries <= 0:
            raise ValueError(f"max_entries must be positive or None, got {max_entries}")
        self.max_entries = max_entries
        self._scores: dict[tuple[int, int, int, str, str, str], float] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # ---- lookup --------------------------------------------------------------------------

    @staticmethod
    def _entry(key: Sequence[int], kind: str, objective: str, judge: str):
        if kind not in KINDS:
            raise ValueError(f"unknown candidate kind {kind!r}; choose one of {', '.join(KINDS)}")
        if objective not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}"
            )
        if not isinstance(judge, str):
            raise TypeError(f"judge identity must be a str, got {type(judge).__name__}")
        if len(key) != 3:
            raise ValueError(f"sample key must be (dataset, document, split_point), got {key!r}")
        dataset, document, split_point = (int(k) for k in key)
        return (dataset, document, split_point, kind, objective, judge)

    def get(self, key: Sequence[int], kind: str, objective: str, judge: str) -> Score:
        """The cached score, or None (counted as a miss)."""
        score = self._scores.get(self._entry(key, kind, objective, judge))
        if score is None:
            self.misses += 1
        else:
            self.hits += 1
        return score

    def put(self, key: Sequence[int], kind: str, objective: str, judge: str, score: Score) -> bool:
        """Caches a score; a missing one (None, NaN) is not stored. Returns whether it was."""
        entry = self._entry(key, kind, objective, judge)
        if not score_present(score):
            return False
        self._scores[entry] = float(score)
        self._evict()
        return True

    def get_many(
        self, keys: Iterable[Sequence[int]], kind: str, objective: str, judge: str
    ) -> list[Score]:
        """:meth:`get` for each sample key, in order."""
        return [self.get(key, kind, objective, judge) for key in keys]

    def put_many(
        self,
        keys: Iterable[Sequence[int]],
        kind: str,
        objective: str,
        judge: str,
        scores: Iterable[Score],
    ) -> int:
        """:meth:`put` for each (sample key, score); returns how many were stored."""
        keys, scores = list(keys), list(scores)
        if len(keys) != len(scores):
            raise ValueError(f"{len(keys)} keys but {len(scores)} scores")
        return sum(self.put(key, kind, objective, judge, s) for key, s in zip(keys, scores))

    def update(self, other: ScoreStore) -> None:
        """Adds ``other``'s entries (its scores win on a clash); counters are kept."""
        for entry, score in other._scores.items():
            self._scores[entry] = score
        self._evict()

    def __contains__(self, item: tuple) -> bool:
        """``(key, kind, objective, judge) in store``; does not count as a hit or miss."""
        return self._entry(*item) in self._scores

    def __len__(self) -> int:
        return len(self._scores)

    def clear(self) -> None:
        self._scores.clear()

    @property
    def hit_rate(self) -> Optional[float]:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else None

    def _evict(self) -> None:
        if self.max_entries is None:
            return
        while len(self._scores) > self.max_entries:
            del self._scores[next(iter(self._scores))]
            self.evictions += 1

    # ---- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The entries as parallel lists of ints, floats and strings (judge identities stored once
        in a table), in insertion order, plus the counters: fit for ``json`` and for
        ``torch.save``/``torch.load(weights_only=True)``."""
        judges: dict[str, int] = {}
        columns: dict[str, list] = {
            name: [] for name in ("dataset", "document", "split_point", "kind", "objective")
        }
        columns["judge"], columns["score"] = [], []
        for (dataset, document, split_point, kind, objective, judge), score in self._scores.items():
            columns["dataset"].append(dataset)
            columns["document"].append(document)
            columns["split_point"].append(split_point)
            columns["kind"].append(KINDS.index(kind))
            columns["objective"].append(OBJECTIVES.index(objective))
            columns["judge"].append(judges.setdefault(judge, len(judges)))
            columns["score"].append(score)
        return {
            "version": _STATE_VERSION,
            "kinds": list(KINDS),
            "objectives": list(OBJECTIVES),
            "judges": list(judges),
            "entries": columns,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replaces the entries and counters with ``state`` (from :meth:`state_dict`). This
        store's own ``max_entries`` applies: if the state holds more, the oldest are evicted."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported score store state version {state.get('version')!r}")
        kinds, objectives, judges = state["kinds"], state["objectives"], state["judges"]
        columns = state["entries"]
        names = ("dataset", "document", "split_point", "kind", "objective", "judge", "score")
        lengths = {len(columns[name]) for name in names}
        if len(lengths) > 1:
            raise ValueError(f"score store state has columns of different lengths: {lengths}")
        scores = {}
        for dataset, document, split_point, kind, objective, judge, score in zip(
            *(columns[name] for name in names)
        ):
            entry = self._entry(
                (dataset, document, split_point), kinds[kind], objectives[objective], judges[judge]
            )
            scores[entry] = float(score)
        self._scores = scores
        self.hits = int(state.get("hits", 0))
        self.misses = int(state.get("misses", 0))
        self.evictions = int(state.get("evictions", 0))
        self._evict()
