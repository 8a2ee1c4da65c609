"""Claim-level factuality: the share of a continuation's atomic claims that a knowledge source
supports (METHOD.md, "Evaluation"; FActScore's measure, with rule-based claim splitting).

A continuation is split into atomic claims (:func:`split_claims`): sentences, then clauses joined
by a semicolon or by ", and" / ", but" / ", while" / ", whereas", each kept when it has at least
``min_words`` words. Each claim is checked against a knowledge source:

- :class:`KnowledgeBaseSource`: the demo's knowledge base (``oracle.json``): a claim that states a
  knowledge-base fact is supported when the fact is true and unsupported when false; a claim that
  states none is not checkable and left out of the share (counted as such);
- :class:`PassageSource`: any JSONL of passages (``{"text": ..., "title": ...}``), the ``k`` most
  relevant retrieved for each claim with BM25 (the ``bm25s`` library), the judge's factuality
  verdict on the claim in the context of those passages deciding (P(true) >= 0.5); a claim the
  judge gives no verdict on is missing, never counted either way.

The score is supported / (supported + unsupported) in percent over all claims of all
continuations (each claim weighs the same), with the counts beside it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Optional

from megatron_sip.roles.base import Judge

SUPPORTED_THRESHOLD = 0.5
_SENTENCE_END = re.compile(r"(?<=[^\s.][.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_CLAUSE_JOIN = re.compile(r"\s*;\s+|,\s+(?:and|but|while|whereas)\s+")
_WORD = re.compile(r"[A-Za-z0-9][\w'’-]*")
_ABBREVIATION = re.compile(
    r"(?:^|\s)(?:Dr|Mr|Mrs|Ms|St|Jr|Sr|Prof|vs|etc|e\.g|i\.e|approx|est|No)\.$"
)


def _sentences(text: str) -> list[str]:
    """Sentences of ``text``, not broken after an abbreviation (Dr., e.g., ...)."""
    pieces: list[str] = []
    for piece in _SENTENCE_END.split(text.strip()):
        if pieces and _ABBREVIATION.search(pieces[-1]):
            pieces[-1] = f"{pieces[-1]} {piece}"
        else:
            pieces.append(piece)
    return [p for p in pieces if p]


def split_claims(text: str, min_words: int = 3) -> list[str]:
    """Atomic claims of ``text``: its sentences, split further at joined clauses (each ending
    with a full stop). Fragments under ``min_words`` words are dropped, and so is the last
    clause of a text that stops mid-sentence (a continuation cut at its token budget): what it
    would have claimed is unknown."""
    claims = []
    sentences = _sentences(text)
    for number, sentence in enumerate(sentences, 1):
        clauses = _CLAUSE_JOIN.split(sentence)
        if number == len(sentences) and sentence.rstrip()[-1:] not in (".", "!", "?"):
            clauses = clauses[:-1]
        for clause in clauses:
            clause = clause.strip().rstrip(",;:")
            if len(_WORD.findall(clause)) >= min_words:
                # A clause cut from its sentence is a sentence of its own.
                claims.append(clause if clause[-1] in ".!?" else f"{clause}.")
    return claims


@dataclasses.dataclass(frozen=True)
class ClaimVerdict:
    claim: str
    supported: Optional[bool]  # None: not checkable (knowledge base) or missing (judge)
    evidence: tuple[str, ...] = ()


class KnowledgeBaseSource:
    """The demo's knowledge base: a claim is checked when it states a fact about a country."""

    checkable_only = True

    def __init__(self, oracle_data: str):
        from megatron_sip.roles.oracle import OracleKnowledge

        self.knowledge = OracleKnowledge.load(str(oracle_data)).knowledge

    def verdicts(self, prefixes: Sequence[str], claims: Sequence[str]) -> list[ClaimVerdict]:
        from megatron_sip.data.demo_corpus import claim_is_true, find_claims

        out = []
        for claim in claims:
            truths = [claim_is_true(c, self.knowledge) for c in find_claims(claim)]
            known = [t for t in truths if t is not None]
            out.append(ClaimVerdict(claim, all(known) if known else None))
        return out


class PassageSource:
    """Passages retrieved with BM25, the judge's factuality verdict deciding."""

    checkable_only = False

    def __init__(self, path: str, judge: Judge, top_k: int = 3):
        import bm25s

        self.passages = read_passages(path)
        self.judge, self.top_k = judge, min(top_k, len(self.passages))
        self._tokenize = bm25s.tokenize
        self.index = bm25s.BM25()
        self.index.index(
            self._tokenize([_passage_text(p) for p in self.passages], show_progress=False),
            show_progress=False,
        )

    def retrieve(self, claims: Sequence[str]) -> list[list[dict]]:
        """The ``top_k`` passages most relevant to each claim, best first."""
        if not claims:
            return []
        ids, _ = self.index.retrieve(
            self._tokenize(list(claims), show_progress=False), k=self.top_k, show_progress=False
        )
        return [[self.passages[int(i)] for i in row] for row in ids]

    def verdicts(self, prefixes: Sequence[str], claims: Sequence[str]) -> list[ClaimVerdict]:
        evidence = self.retrieve(claims)
        contexts = ["\n".join(_passage_text(p) for p in found) for found in evidence]
        scores = self.judge.factuality(contexts, list(claims)) if claims else []
        return [
            ClaimVerdict(
                claim,
                None if score is None else score >= SUPPORTED_THRESHOLD,
                tuple(p.get("id", "") for p in found),
            )
            for claim, score, found in zip(claims, scores, evidence)
        ]


def read_passages(path: str) -> list[dict]:
    """Rows of a passages JSONL file; each needs a non-empty string "text" (errors name the
    file and line)."""
    from megatron_sip.eval.continuations import read_jsonl

    try:
        numbered = read_jsonl(path)
    except OSError as error:
        raise ValueError(f"{path}: cannot read passages ({error})") from None
    for number, row in numbered:
        if not isinstance(row.get("text"), str) or not row["text"]:
            raise ValueError(f'{path}:{number}: a passage needs a non-empty string "text"')
    if not numbered:
        raise ValueError(f"{path}: no passages")
    return [row for _, row in numbered]


def _passage_text(passage: dict) -> str:
    title = passage.get("title")
    return f"{title}. {passage['text']}" if title else passage["text"]


def claim_factuality(
    prefixes: Sequence[str], continuations: Sequence[str], source, min_words: int = 3
) -> dict:
    """The share of supported claims over every continuation (percent), with counts: claims,
    supported, unsupported, not checkable (knowledge base) or missing (judge), and the claims
    per continuation."""
    owners, claims = [], []
    for index, text in enumerate(continuations):
        for claim in split_claims(text, min_words):
            owners.append(index)
            claims.append(claim)
    verdicts = source.verdicts([prefixes[i] for i in owners], claims)
    supported = sum(v.supported is True for v in verdicts)
    unsupported = sum(v.supported is False for v in verdicts)
    undecided = len(verdicts) - supported - unsupported
    decided = supported + unsupported
    return {
        "score": round(100.0 * supported / decided, 4) if decided else None,
        "claims": len(claims),
        "supported": supported,
        "unsupported": unsupported,
        ("not_checkable" if source.checkable_only else "missing"): undecided,
        "claims_per_continuation": round(len(claims) / len(continuations), 4)
        if continuations
        else 0.0,
    }
