"""Judge and rewriter prompt templates: one file per objective in a prompt directory.

A template's first line names its verdict strings (``# verdicts: [[A]] [[B]]``, the positive
verdict first) or, for the rewriter, its stop string (``# stop: </rewrite>``); the rest is the
prompt, with ``{prefix}`` and ``{candidate}`` (``{a}``/``{b}`` for pairwise quality,
``{suffix}`` for the rewriter) between explicit tags. Candidate text is sanitised before it is
put between the tags: it cannot close a tag or write a verdict string. The prompt ends at the
answer position (the verdict is the very next token).
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
    if len(ids) != 1:
        raise ValueError(
            f"verdict {verdict!r} is {len(ids)} tokens for this tokenizer; verdict strings must "
            "be single tokens (train the tokenizer with them as user-defined symbols)"
        )
    return ids[0]


class PromptedJudge(Judge):
    """A judge that renders the templates and reads a verdict probability per prompt; backends
    (colocated model, HTTP server) only implement ``verdicts``."""

    def __init__(self, prompts: PromptSet, max_prefix_chars: int):
        self.prompts = prompts
        self.max_prefix_chars = max_prefix_chars

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
        _check_lengths(prefixes, texts)
        rendered = [self.render("safety", prefix=p, candidate=t) for p, t in zip(prefixes, texts)]
        return self.verdicts("safety", rendered)

    def factuality(self, prefixes, texts) -> list[Score]:
        _check_lengths(prefixes, texts)
        rendered = [
            self.render("factuality", prefix=p, candidate=t) for p, t in zip(prefixes, texts)
        ]
        return self.verdicts("factuality", rendered)
