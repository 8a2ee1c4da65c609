"""Rewards from judge scores, rewriter RL rewards, and a cache of judge scores that depend only on
the data.

* The SIP reward of a candidate suffix is ``r(c) = sum_o w_o * J_o(c)`` over the enabled objectives
  (``--sip-objectives``, ``--sip-objective-weights``). A candidate with any enabled objective's
  score missing has no reward (``None``): a missing score is never replaced by a default.
* The rewriter's RL reward (METHOD.md, "Rewriter and judge training"): on a safe context the
  rewrite should leave the original alone; on an unsafe one it should be good and safe.
* :class:`ScoreStore` caches the judge's scores of the original suffix and of its rewrite, which do
  not change during training, keyed by the sample (``SIPSample.key``), the candidate kind, the
  objective and the judge's identity. Its state is plain lists, so it can be saved with a
  checkpoint's common state and restored on resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

from megatron_sip.errors import ConfigError

Score = Optional[float]

OBJECTIVES = ("quality", "safety", "factuality")
"""Every objective a judge can score, in a fixed order."""

ObjectiveScores = dict[str, Score]
"""One candidate's judge scores: objective name -> score in [0, 1], or None when missing."""

SAFE_CONTEXT_THRESHOLD = 0.5
"""A context (its original suffix) is safe when J_safe(original) is at least this."""

ORIGINAL_SELF_QUALITY = 0.5
"""J_qual(original, original | prefix): the original compared with itself, by definition."""


# --------------------------------------------------------------------------------------------
# the SIP reward
# --------------------------------------------------------------------------------------------


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


def _present(score: Any) -> bool:
    """A usable score: not None and not NaN (a NaN can only come from a broken judge)."""
    return score is not None and not (isinstance(score, float) and math.isnan(score))


def weighted_reward(scores: Mapping[str, Score], weights: Mapping[str, float]) -> Score:
    """``sum_o weights[o] * scores[o]`` over the objectives in ``weights`` (the enabled ones).

    None when any enabled objective's score is missing (absent, None or NaN), even one whose
    weight is 0: a missing score means the judge failed on this candidate, and no value is made
    up for it. Scores of objectives that are not enabled are ignored.
    """
    total = 0.0
    for objective, weight in weights.items():
        score = scores.get(objective)
        if not _present(score):
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


# --------------------------------------------------------------------------------------------
# rewriter RL rewards
# --------------------------------------------------------------------------------------------


def context_is_safe(safety_of_original: Score) -> Optional[bool]:
    """Whether a context is safe: J_safe(original suffix) >= 0.5. None when that score is
    missing."""
    if not _present(safety_of_original):
        return None
    return float(safety_of_original) >= SAFE_CONTEXT_THRESHOLD


def rewriter_reward(
    original: str,
    rewrite: Optional[str],
    context_safe: Optional[bool],
    quality: Score,
    safety: Score,
) -> Score:
    """The rewriter's RL reward for one rewrite.

    Safe context: 1.0 when the rewrite equals the original, else 0.0. "Equals" is exact string
    equality after stripping leading and trailing whitespace on both sides, so a rewriter is not
    penalised for the whitespace a detokenizer or a prompt template adds or drops at the edges,
    while any change inside the text (case, punctuation, inner spacing) counts as a change.

    Unsafe context: ``0.5 * (quality + safety)``, with ``quality`` = J_qual(rewrite, original |
    prefix) and ``safety`` = J_safe(rewrite); None when either is missing.

    None also when ``context_safe`` is None (the original's safety is unknown, see
    :func:`context_is_safe`) or the rewriter produced no rewrite.
    """
    if context_safe is None or rewrite is None:
        return None
    if context_safe:
        return 1.0 if rewrite.strip() == original.strip() else 0.0
    if not _present(quality) or not _present(safety):
        return None
    return 0.5 * (float(quality) + float(safety))


def rewriter_rewards(
    originals: Sequence[str],
    rewrites: Sequence[Optional[str]],
    safety_of_originals: Sequence[Score],
    qualities: Sequence[Score],
    safeties: Sequence[Score],
) -> list[Score]:
    """:func:`rewriter_reward` of each rewrite, the context's safety from its original's
    J_safe."""
    lengths = {len(originals), len(rewrites), len(safety_of_originals), len(qualities)}
    lengths.add(len(safeties))
    if len(lengths) > 1:
        raise ValueError(f"batched call with columns of different lengths: {sorted(lengths)}")
    return [
        rewriter_reward(original, rewrite, context_is_safe(safe_original), quality, safety)
        for original, rewrite, safe_original, quality, safety in zip(
            originals, rewrites, safety_of_originals, qualities, safeties
        )
    ]


# --------------------------------------------------------------------------------------------
# the score store
# --------------------------------------------------------------------------------------------

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
        if not _present(score):
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
