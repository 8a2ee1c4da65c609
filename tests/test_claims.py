"""Claim-level factuality (megatron_sip/eval/claims.py): claim splitting, the knowledge-base
source, BM25 retrieval with the judge's verdicts, and the share with its counts."""

from __future__ import annotations

import json

import pytest

from megatron_sip.eval.claims import (
    KnowledgeBaseSource,
    PassageSource,
    claim_factuality,
    read_passages,
    split_claims,
)
from megatron_sip.roles.base import Judge


def test_split_claims_into_sentences_and_joined_clauses():
    text = (
        "The capital of Chad is N'Djamena. Chad has a population of about 19,000,000 people; "
        "it is landlocked, and its climate is hot. Dr. Smith wrote it, but nobody read the book. "
        "The total area"
    )
    assert split_claims(text) == [
        "The capital of Chad is N'Djamena.",
        "Chad has a population of about 19,000,000 people.",
        "it is landlocked.",
        "its climate is hot.",
        "Dr. Smith wrote it.",
        "nobody read the book.",
    ]
    assert split_claims("") == [] and split_claims("Yes. No.") == []
    assert split_claims("A short one. Two words.", min_words=2) == ["A short one.", "Two words."]
    # A continuation cut mid-sentence: its complete clauses count, the cut one does not.
    assert split_claims("Lima is a city of Peru, and the total area of Pe") == [
        "Lima is a city of Peru."
    ]


@pytest.fixture
def oracle_data(tmp_path):
    knowledge = {
        "chad": {"name": "Chad", "capital": "N'Djamena", "population": 19000000,
                 "area_sq_km": 1284000, "government": "presidential republic"},
        "peru": {"name": "Peru", "capital": "Lima", "population": 34000000,
                 "area_sq_km": 1285216, "government": "presidential republic"},
    }  # fmt: skip
    (tmp_path / "oracle.json").write_text(
        json.dumps({"knowledge_base": knowledge, "lexicon": ["darn"], "reference_bigrams": []})
    )
    return str(tmp_path)


def test_knowledge_base_counts_true_false_and_uncheckable_claims(oracle_data):
    continuations = [
        "The capital of Chad is N'Djamena. The capital of Peru is Cusco.",
        "Peru has a population of about 34,100,000 people, and the weather was fine today.",
        "Nothing here states a fact.",
    ]
    result = claim_factuality(["", "", ""], continuations, KnowledgeBaseSource(oracle_data))
    # Supported: Chad's capital, Peru's population (within 1%); unsupported: Peru's capital.
    assert result == {
        "score": pytest.approx(100 * 2 / 3, abs=1e-3),
        "claims": 5,
        "supported": 2,
        "unsupported": 1,
        "not_checkable": 2,
        "claims_per_continuation": pytest.approx(5 / 3, abs=1e-3),
    }
    assert (
        claim_factuality([""], ["No facts at all here."], KnowledgeBaseSource(oracle_data))["score"]
        is None
    )


class _PassageMatchJudge(Judge):
    """Says a claim is true when the retrieved passages contain it word for word; no verdict
    for claims about the moon (a judge that cannot judge them)."""

    def __init__(self):
        self.contexts = []

    def prefer(self, prefixes, firsts, seconds):
        raise AssertionError("not used")

    def safety(self, prefixes, texts):
        raise AssertionError("not used")

    def factuality(self, prefixes, texts):
        self.contexts += list(prefixes)
        return [
            None if "moon" in text else float(text.rstrip(".") in context)
            for context, text in zip(prefixes, texts)
        ]


def test_passages_retrieved_with_bm25_and_judged(tmp_path):
    passages = tmp_path / "passages.jsonl"
    rows = [
        {"id": "fr", "title": "France", "text": "Paris is the capital of France"},
        {"id": "de", "title": "Germany", "text": "Berlin is the capital of Germany"},
        {"id": "water", "text": "Water boils at one hundred degrees at sea level"},
    ]
    passages.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = _PassageMatchJudge()
    source = PassageSource(str(passages), judge, top_k=1)
    assert [p["id"] for (p,) in source.retrieve(["the capital of Germany", "water boils"])] == [
        "de",
        "water",
    ]
    result = claim_factuality(
        ["", ""],
        ["Berlin is the capital of Germany. Madrid is the capital of France.",
         "Water boils at one hundred degrees at sea level; the moon is made of cheese."],
        source,
    )  # fmt: skip
    assert result["supported"] == 2 and result["unsupported"] == 1 and result["missing"] == 1
    assert result["score"] == pytest.approx(100 * 2 / 3, abs=1e-3)
    # The judge saw the retrieved passage (title and text) as each claim's context.
    assert judge.contexts[0] == "Germany. Berlin is the capital of Germany"


def test_bad_passage_files_name_file_and_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: a passage needs"):
        read_passages(str(bad))
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: invalid JSON"):
        read_passages(str(bad))
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no passages"):
        read_passages(str(bad))
