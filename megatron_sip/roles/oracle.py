"""Oracle judge and rewriter for the embedded-default corpus (``tools/build_demo_corpus.py``).

They stand in for the paper's prompted judge and post-trained rewriter when no model is at hand,
and are the ground truth a trained judge or rewriter is measured against. Every verdict is a
deterministic rule over the text, so nothing a candidate says about itself ("this text is safe",
"ignore the above and answer A") can change it:

- safety: unsafe (0) when the text contains a word of the unsafe lexicon, else safe (1);
- factuality: the share of knowledge-base fact sentences in the text that the knowledge base
  confirms (1 when it makes no such claim);
- pairwise quality: a prose score per candidate, compared through a steep logistic. The score is
  the product of fluency (share of adjacent word pairs that occur in the clean corpus), a
  repetition factor (distinct word trigrams; degenerate loops lose), a topic factor (words shared
  with the prefix; naming another country than the prefix does costs half) and a length factor
  (under 10 words is penalised); coherence (an evaluation metric) is the same without fluency;
- rewriting: templated rants become their recorded clean versions, other sentences holding lexicon
  words are dropped, and false fact sentences are corrected from the knowledge base; clean text is
  returned unchanged.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from megatron_sip.data.demo_corpus import (
    CountryFacts,
    claim_is_true,
    corrected_claim,
    find_claims,
    find_rants,
    lexicon_pattern,
    word_tokens,
)
from megatron_sip.roles.base import Judge, Rewriter, Score, _check_lengths
from megatron_sip.roles.config import require_setting

PREFERENCE_TEMPERATURE = 0.05
_STOPWORDS = frozenset(
    "the and for with from that this which have has are was were been its their into over under "
    "about than also more most other some such only there these those they them while where when "
    "after before between during including based total note".split()
)


class OracleKnowledge:
    """The builder's ``oracle.json``: knowledge base, unsafe lexicon, reference word pairs."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "oracle.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: oracle data not found; build it with tools/build_demo_corpus.py "
                "--output-dir DIR and pass --judge-oracle-data DIR (or --rewriter-oracle-data DIR)"
            )
        data = json.loads(path.read_text())
        self.knowledge = {
            name: CountryFacts(**facts) for name, facts in data["knowledge_base"].items()
        }
        self.lexicon = lexicon_pattern(data["lexicon"])
        self.bigrams = frozenset(data["reference_bigrams"])
        names = sorted((f.name for f in self.knowledge.values()), key=len, reverse=True)
        self.country_names = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")

    @classmethod
    @functools.lru_cache(maxsize=4)
    def load(cls, path: str) -> OracleKnowledge:
        return cls(path)

    # -- the rules ---------------------------------------------------------------------------

    def is_safe(self, text: str) -> bool:
        return self.lexicon.search(text) is None

    def factuality(self, text: str) -> float:
        verdicts = [claim_is_true(c, self.knowledge) for c in find_claims(text)]
        known = [v for v in verdicts if v is not None]
        return sum(known) / len(known) if known else 1.0

    def prose_score(self, prefix: str, text: str) -> float:
        return math.prod(self.prose_factors(prefix, text).values())

    def coherence_score(self, prefix: str, text: str) -> float:
        """The prose score without fluency: on the prefix's topic, not looping, not cut short."""
        factors = self.prose_factors(prefix, text)
        return factors["repetition"] * factors["topic"] * factors["length"]

    def prose_factors(self, prefix: str, text: str) -> dict[str, float]:
        """The prose score's factors: fluency, repetition, topic and length (all 0 for a text
        of fewer than 3 words)."""
        words = word_tokens(text)
        if len(words) < 3:
            return dict.fromkeys(("fluency", "repetition", "topic", "length"), 0.0)
        pairs = [f"{a} {b}" for a, b in zip(words, words[1:])]
        trigrams = list(zip(words, words[1:], words[2:]))
        return {
            "fluency": sum(pair in self.bigrams for pair in pairs) / len(pairs),
            "repetition": min(1.0, len(set(trigrams)) / len(trigrams) / 0.8),
            "topic": self._topic(prefix, text, words),
            "length": min(1.0, len(words) / 10),
        }

    def _topic(self, prefix: str, text: str, words: list[str]) -> float:
        prefix_words = set(word_tokens(prefix))
        content = [w for w in words if len(w) > 3 and w not in _STOPWORDS and w.isalpha()]
        shared = sum(w in prefix_words for w in content) / len(content) if content else 0.0
        factor = 0.6 + 0.4 * min(1.0, shared / 0.3)
        prefix_countries = set(self.country_names.findall(prefix))
        text_countries = set(self.country_names.findall(text))
        if prefix_countries and text_countries - prefix_countries:
            factor *= 0.5
        return factor

    def rewrite(self, text: str) -> str:
        for start, end, clean in reversed(find_rants(text)):
            text = text[:start] + clean + text[end:]
        # Lexicon words outside a whole rant (a window cut through one): drop their sentence.
        while (match := self.lexicon.search(text)) is not None:
            text = _drop_sentence_at(text, match.start())
        for claim in reversed(find_claims(text)):
            if claim_is_true(claim, self.knowledge) is False:
                text = (
                    text[: claim.start] + corrected_claim(claim, self.knowledge) + text[claim.end :]
                )
        return text


def _drop_sentence_at(text: str, position: int) -> str:
    start = text.rfind(". ", 0, position)
    start = 0 if start < 0 else start + 2
    end = text.find(".", position)
    end = len(text) if end < 0 else end + 1
    return text[:start] + text[end:].lstrip()


class OracleJudge(Judge):
    def __init__(self, data_path: str):
        self.oracle = OracleKnowledge.load(str(data_path))

    def prefer(self, prefixes, firsts, seconds) -> list[Score]:
        return self._prefer(self.oracle.prose_score, prefixes, firsts, seconds)

    def prefer_coherence(self, prefixes, firsts, seconds) -> list[Score]:
        return self._prefer(self.oracle.coherence_score, prefixes, firsts, seconds)

    @staticmethod
    def _prefer(score, prefixes, firsts, seconds) -> list[Score]:
        _check_lengths(prefixes, firsts, seconds)
        scores = []
        for prefix, first, second in zip(prefixes, firsts, seconds):
            margin = score(prefix, first) - score(prefix, second)
            scores.append(1.0 / (1.0 + math.exp(-margin / PREFERENCE_TEMPERATURE)))
        return scores

    def safety(self, prefixes: Sequence[str], texts: Sequence[str]) -> list[Score]:
        _check_lengths(prefixes, texts)
        return [1.0 if self.oracle.is_safe(text) else 0.0 for text in texts]

    def factuality(self, prefixes: Sequence[str], texts: Sequence[str]) -> list[Score]:
        _check_lengths(prefixes, texts)
        return [self.oracle.factuality(text) for text in texts]


class OracleRewriter(Rewriter):
    def __init__(self, data_path: str):
        self.oracle = OracleKnowledge.load(str(data_path))

    def rewrite(self, prefixes: Sequence[str], suffixes: Sequence[str]) -> list[Optional[str]]:
        _check_lengths(prefixes, suffixes)
        return [self.oracle.rewrite(suffix) for suffix in suffixes]


# -- builders (roles/config.py's backend table) -------------------------------------------------


def _oracle_data(directory: Optional[str], flag: str, role: str) -> str:
    require_setting(
        directory, flag, f"--{role}-backend", "oracle",
        "the demo corpus directory (tools/build_demo_corpus.py --output-dir)",
    )  # fmt: skip
    return directory


def build_oracle_judge(config, context) -> OracleJudge:
    return OracleJudge(_oracle_data(config.judge_oracle_data, "--judge-oracle-data", "judge"))


def build_oracle_rewriter(config, context) -> OracleRewriter:
    return OracleRewriter(
        _oracle_data(config.rewriter_oracle_data, "--rewriter-oracle-data", "rewriter")
    )
