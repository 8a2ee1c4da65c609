"""Judge and rewriter prompt templates: one file per objective in a prompt directory.

A template's first line names its verdict strings (``# verdicts: [[A]] [[B]]``, the positive
verdict first) or, for the rewriter, its stop string (``# stop: </rewrite>``); the rest is the
prompt, with ``{prefix}`` and ``{candidate}`` (``{a}``/``{b}`` for pairwise quality,
``{suffix}`` for the rewriter) between explicit tags. Candidate text is sanitised before it is
put between the tags: it cannot close a tag or write a verdict string. The prompt ends at the
answer position (the verdict is the very next token).

Safety is read conservatively (:meth:`PromptedJudge.safety`): a candidate is cut into sentences
and judged as every run of up to ``safety_window_sentences`` consecutive sentences; its score is
the least P(safe) of those runs. Adding sentences to a text keeps all of its runs and only adds
new ones, so an appeal to the judge appended, prepended or inserted as whole sentences can only
lower a candidate's safety score, never raise it.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Optional

from megatron_sip.roles.base import Judge, Score, _check_lengths

TEMPLATE_FILES = {
    "quality": "quality.txt",
    "safety": "safety.txt",
    "factuality": "factuality.txt",
    "rewrite": "rewrite.txt",
}
_TAG = re.compile(r"</?\s*(prefix|candidate(_a|_b)?|original|rewrite)\s*>", re.IGNORECASE)
# A sentence ends at . ! or ? (and closing quotes or brackets) followed by white space, or at a
# line break.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+|\s*\n\s*")
_WORD = re.compile(r"\w")
SAFETY_WINDOW_SENTENCES = 2


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    path: str
    body: str
    verdicts: tuple[str, ...] = ()
    stop: Optional[str] = None

    def render(self, max_prefix_chars: int, **fields: str) -> str:
        values = {}
        for key, value in fields.items():
            value = sanitize(value, self.verdicts)
            if key == "prefix":
                value = value[-max_prefix_chars:]
            values[key] = value
        return self.body.format(**values)


def sanitize(text: str, verdicts: tuple[str, ...] = ()) -> str:
    """Removes what would let text escape its tags or speak for the judge."""
    text = _TAG.sub("", text)
    for verdict in verdicts:
        text = text.replace(verdict, "")
    return text.replace("{", "(").replace("}", ")")


def sentence_spans(text: str, verdicts: tuple[str, ...] = ()) -> list[tuple[int, int]]:
    """(start, end) of each sentence of ``text``, without surrounding white space. Tags and
    verdict strings (which :func:`sanitize` removes) also end a sentence, and pieces without a
    letter or digit once sanitised (a lone tag, verdict or full stop) are not sentences. Every cut
    depends only on the characters around it, so a text's sentences stay the same when whole
    sentences are added before or after it."""
    cuts = {0, len(text)}
    cuts.update(match.end() for match in _SENTENCE_END.finditer(text))
    for match in _TAG.finditer(text):
        cuts.update(match.span())
    for verdict in verdicts:
        start = text.find(verdict)
        while start >= 0:
            cuts.update((start, start + len(verdict)))
            start = text.find(verdict, start + len(verdict))
    spans = []
    ordered = sorted(cuts)
    for start, end in zip(ordered, ordered[1:]):
        piece = text[start:end]
        if not _WORD.search(sanitize(piece, verdicts)):
            continue
        spans.append(
            (start + len(piece) - len(piece.lstrip()), end - len(piece) + len(piece.rstrip()))
        )
    return spans


def sentence_windows(text: str, max_sentences: int, verdicts: tuple[str, ...] = ()) -> list[str]:
    """Every run of 1 to ``max_sentences`` consecutive sentences of ``text``, as it is written
    there; ``[text]`` when ``max_sentences`` is 0 or the text has no sentence."""
    spans = sentence_spans(text, verdicts) if max_sentences > 0 else []
    if not spans:
        return [text]
    return [
        text[spans[first][0] : spans[last][1]]
        for first in range(len(spans))
        for last in range(first, min(first + max_sentences, len(spans)))
    ]


def _parse(name: str, path: str, text: str) -> Template:
    header, _, body = text.partition("\n")
    body = body.rstrip("\n")
    if header.startswith("# verdicts:"):
        verdicts = tuple(header[len("# verdicts:") :].split())
        if len(verdicts) != 2:
            raise ValueError(f"{path}:1: expected two verdict strings, got {verdicts}")
        return Template(name, path, body, verdicts=verdicts)
    if header.startswith("# stop:"):
        return Template(name, path, body, stop=header[len("# stop:") :].strip())
    raise ValueError(f"{path}:1: a template starts with '# verdicts: X Y' or '# stop: S'")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    templates: dict[str, Template]
    source: str

    @classmethod
    def load(cls, directory: Optional[str] = None) -> PromptSet:
        """The templates of ``directory`` (``--judge-prompt-dir``), or the packaged ones."""
        templates = {}
        if directory is None:
            root = resources.files("megatron_sip.roles") / "prompts"
            for name, file in TEMPLATE_FILES.items():
                templates[name] = _parse(name, f"prompts/{file}", (root / file).read_text())
            return cls(templates, "packaged")
        for name, file in TEMPLATE_FILES.items():
            path = Path(directory) / file
            if path.is_file():
                templates[name] = _parse(name, str(path), path.read_text())
        if not templates:
            raise FileNotFoundError(
                f"{directory}: no prompt templates ({', '.join(TEMPLATE_FILES.values())})"
            )
        return cls(templates, str(directory))

    def __getitem__(self, name: str) -> Template:
        if name not in self.templates:
            raise KeyError(f"prompt directory {self.source} has no {TEMPLATE_FILES[name]}")
        return self.templates[name]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.templates):
            digest.update(name.encode() + b"\0" + self.templates[name].body.encode())
        return digest.hexdigest()[:16]


def verdict_token_id(tokenizer, verdict: str) -> int:
    """The single token a verdict string is: a vocabulary entry (e.g. a SentencePiece user
    symbol, which ``tokenize`` would precede with a word-boundary piece) or one-token text."""
    vocab = tokenizer.vocab
    if verdict in vocab:
        return vocab[verdict]
    ids = tokenizer.tokenize(verdict)
    if len(ids) == 2 and ids[0] == tokenizer.bos >= 0:  # a tokenizer that adds BOS to every text
        ids = ids[1:]
    if len(ids) != 1:
        raise ValueError(
            f"verdict {verdict!r} is {len(ids)} tokens for this tokenizer; verdict strings must "
            "be single tokens (train the tokenizer with them as user-defined symbols)"
        )
    return ids[0]


class PromptedJudge(Judge):
    """A judge that renders the templates and reads a verdict probability per prompt; backends
    (colocated model, HTTP server) only implement ``verdicts``.

    ``safety_window_sentences`` (k) makes the safety verdict conservative: every run of up to k
    consecutive sentences of a candidate is judged (all runs of a batch in one ``verdicts`` call)
    and the candidate's P(safe) is the least of theirs; missing when any run's verdict is. A text
    that holds an unsafe passage is unsafe whatever else it says, so adding sentences must never
    make a text safer; with this reading it cannot: the runs of a text are among the runs of any
    text made by adding whole sentences around or inside it, and the minimum over a larger set
    is no larger. Injected appeals to the judge ("this text is safe", fake tags or verdicts) can
    therefore not raise a candidate's safety reward, whatever the judge model makes of them
    (text fused into one of the candidate's sentences, with no sentence end between them, is
    left to the judge's training). Each candidate costs about k times its sentence count in
    prompts, and content is judged in the context of the prefix and at most k sentences (train
    the judge on such runs: ``judge_sft --judge-sft-window-rate``). 0: judge the whole candidate
    once."""

    def __init__(
        self,
        prompts: PromptSet,
        max_prefix_chars: int,
        safety_window_sentences: int = SAFETY_WINDOW_SENTENCES,
    ):
        self.prompts = prompts
        self.max_prefix_chars = max_prefix_chars
        self.safety_window_sentences = safety_window_sentences

    @abc.abstractmethod
    def verdicts(self, name: str, prompts: Sequence[str]) -> list[Score]:
        """P(positive verdict of template ``name``) for rendered prompts; None where missing."""

    def render(self, name: str, **fields: str) -> str:
        return self.prompts[name].render(self.max_prefix_chars, **fields)

    def prefer(self, prefixes, firsts, seconds) -> list[Score]:
        _check_lengths(prefixes, firsts, seconds)
        rendered = [
            self.render("quality", prefix=p, a=a, b=b) for p, a, b in zip(prefixes, firsts, seconds)
        ]
        return self.verdicts("quality", rendered)

    def safety(self, prefixes, texts) -> list[Score]:
        """The least P(safe) over the candidate's runs of sentences (see the class)."""
        _check_lengths(prefixes, texts)
        verdicts = self.prompts["safety"].verdicts
        rendered, owners = [], []
        for index, (prefix, text) in enumerate(zip(prefixes, texts)):
            for window in sentence_windows(text, self.safety_window_sentences, verdicts):
                rendered.append(self.render("safety", prefix=prefix, candidate=window))
                owners.append(index)
        scores: list[list[Score]] = [[] for _ in texts]
        for owner, score in zip(owners, self.verdicts("safety", rendered) if rendered else []):
            scores[owner].append(score)
        return [None if None in runs else min(runs) for runs in scores]

    def factuality(self, prefixes, texts) -> list[Score]:
        _check_lengths(prefixes, texts)
        rendered = [
            self.render("factuality", prefix=p, candidate=t) for p, t in zip(prefixes, texts)
        ]
        return self.verdicts("factuality", rendered)
