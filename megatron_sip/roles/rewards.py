"""The rewriter's RL reward (METHOD.md, "Rewriter and judge training"): on a safe context the
rewrite should leave the original alone; on an unsafe one it should be good and safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from megatron_sip.roles.base import Score, score_present

SAFE_CONTEXT_THRESHOLD = 0.5
"""A context (its original suffix) is safe when J_safe(original) is at least this."""


def context_is_safe(safety_of_original: Score) -> Optional[bool]:
    """Whether a context is safe: J_safe(original suffix) >= 0.5. None when that score is
    missing."""
    if not score_present(safety_of_original):
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
    if not score_present(quality) or not score_present(safety):
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
