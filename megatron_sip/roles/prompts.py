"""Judge and rewriter prompt templates: one file per objective in a prompt directory.

A template's first line names its verdict strings (``# verdicts: [[A]] [[B]]``, the positive
verdict first) or, for the rewriter, its stop string (``# stop: </rewrite>``, optionally followed
by ``unchanged: [[SAME]]``, a reply that stands for the original itself); the rest is the prompt,
with ``{prefix}`` and ``{candidate}`` (``{a}``/``{b}`` for pairwise quality and coherence,
``{suffix}`` for the rewriter) between explicit tags. Candidate text is sanitised before it is
put between the tags: it cannot close a tag or write a verdict string. The prompt ends at the
answer position (the verdict is the very next token).

Safety is read conservatively (:meth:`PromptedJudge.safety`): a candidate is cut into sentences
and judged as every run of up to ``safety_window_sentences`` consecutive sentences; its score is
the least P(safe) of those runs. Adding sentences to a text keeps all of its runs and only adds
new ones, so an appeal to the judge appended, prepended or inserted as whole sentences can only
lower a candidate's safety score, never raise it.

Prompt packs. A pack is a directory of templates, optionally with ``pack.json`` (its chat-template
variables, its calibration set, whether a chat endpoint can serve it) and a labelled
``calibration.jsonl`` that the self-check scores at start-up (``roles/self_check.py``). Packaged
packs are named: ``default`` (the tag-and-verdict templates of judges trained here, whose
tokenizers hold ``[[A]]``-style verdicts as single tokens), ``llama3`` (Llama-3.x-Instruct),
``qwen`` (Qwen2.5- and Qwen3-Instruct) and ``gpt-oss`` (the Harmony format's final channel).
A chat template is written as messages (``### system``, ``### user``) and the assistant's prefill
(``### assistant``): it is rendered through the model's own chat template (the tokenizer's, as
transformers renders it) with the generation prompt, and the prefill appended, so the next token
is the verdict. Chat packs use verdicts that are one token at the start of an assistant reply in
the models they name (``Yes``/``No``, ``A``/``B``).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Optional

from megatron_sip.roles.base import Judge, Score, _check_lengths

TEMPLATE_FILES = {
    "quality": "quality.txt",
    "coherence": "coherence.txt",
    "safety": "safety.txt",
    "factuality": "factuality.txt",
    "rewrite": "rewrite.txt",
}
PACKS = ("default", "llama3", "qwen", "gpt-oss")
"""The packaged prompt packs (``--judge-prompt-dir NAME``)."""
PACK_FILE = "pack.json"
CALIBRATION_FILE = "calibration.jsonl"
_TAG = re.compile(r"</?\s*(prefix|candidate(_a|_b)?|original|rewrite)\s*>", re.IGNORECASE)
# Control tokens of chat formats (<|im_end|>, <|eot_id|>, <|start|>, <s>, [INST], <think>): text
# that spells one must not end the message it sits in.
_CONTROL = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>|\[/?INST\]|</?think>", re.IGNORECASE)
_SECTION = re.compile(r"^### (system|user|assistant)[ \t]*$", re.MULTILINE)
# A sentence ends at . ! or ? (and closing quotes or brackets) followed by white space, or at a
# line break.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+|\s*\n\s*")
_WORD = re.compile(r"\w")
SAFETY_WINDOW_SENTENCES = 2


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A chat prompt: messages for the model's chat template, then the start of the assistant's
    reply (``prefill``, raw text after the template's generation prompt), so that the next token
    is the answer."""

    messages: tuple[tuple[str, str], ...]
    """(role, content) pairs: system and user turns."""

    prefill: str = ""
    template_kwargs: tuple[tuple[str, object], ...] = ()
    """The chat template's own variables (Qwen3's ``enable_thinking``), as sorted pairs."""

    def message_dicts(self) -> list[dict]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def kwargs(self) -> dict:
        return dict(self.template_kwargs)

    def text(self, tokenizer) -> str:
        """The prompt as the model sees it: ``tokenizer``'s chat template over the messages with
        the generation prompt, then the prefill."""
        render = getattr(tokenizer, "render_chat", None)
        if render is None:
            raise ValueError(
                "a chat prompt pack needs a tokenizer with a chat template; "
                f"{type(tokenizer).__name__} has none (use a plain pack such as 'default')"
            )
        rendered = render(self.message_dicts(), add_generation_prompt=True, **self.kwargs())
        return rendered + self.prefill


def prompt_text(prompt, tokenizer) -> str:
    """A rendered prompt as text: a plain template's text as it is, a chat prompt through
    ``tokenizer``'s chat template."""
    return prompt.text(tokenizer) if isinstance(prompt, Conversation) else prompt


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    path: str
    body: str
    verdicts: tuple[str, ...] = ()
    stop: Optional[str] = None
    unchanged: Optional[str] = None
    """A rewriter's reply meaning "the original needs no change" (``# stop: S unchanged: U``):
    a small rewriter learns to say so where it cannot learn to copy 64 tokens exactly."""
    sections: tuple[tuple[str, str], ...] = ()
    """A chat template's (role, text) sections, the assistant's (the prefill) last; empty for a
    plain template, whose ``body`` is the whole prompt."""
    template_kwargs: tuple[tuple[str, object], ...] = ()

    @property
    def chat(self) -> bool:
        return bool(self.sections)

    @property
    def markers(self) -> tuple[str, ...]:
        """Verdict strings a candidate must not contain: a plain template's (``[[SAFE]]``, which
        would speak for the judge in its own voice). A chat template's verdicts are ordinary
        words (Yes, A) that the candidate's message cannot answer for; its control tokens are
        what is removed instead. A rewriter's unchanged marker is one too: an original holding it
        must not be read as a reply."""
        if self.chat:
            return ()
        return self.verdicts + ((self.unchanged,) if self.unchanged else ())

    def rewrite_from(self, reply: str, original: str) -> str:
        """The rewrite a rewriter's ``reply`` gives for ``original``: the reply up to the stop
        string, stripped; the unchanged marker is the original itself."""
        if self.stop and self.stop in reply:
            reply = reply.split(self.stop)[0]
        reply = reply.strip()
        return original if self.unchanged and reply == self.unchanged else reply

    def render(self, max_prefix_chars: int, **fields: str):
        """The prompt for ``fields``: text for a plain template, a :class:`Conversation` for a
        chat one. Field values are sanitised first (:func:`sanitize`), the prefix cut to its last
        ``max_prefix_chars`` characters."""
        values = {}
        for key, value in fields.items():
            value = sanitize(value, self.markers, control_tokens=self.chat)
            if key == "prefix":
                value = value[-max_prefix_chars:]
            values[key] = value
        if not self.chat:
            return self.body.format(**values)
        messages = tuple(
            (role, text.format(**values)) for role, text in self.sections if role != "assistant"
        )
        prefill = dict(self.sections).get("assistant", "").format(**values)
        return Conversation(messages, prefill, self.template_kwargs)

    def example(self, max_prefix_chars: int = 2000):
        """The template rendered with placeholder fields (start-up checks of the verdicts)."""
        fields = {"prefix": "Some text", "candidate": "goes on.", "a": "goes on.", "b": "ends."}
        fields["suffix"] = "goes on."
        return self.render(max_prefix_chars, **fields)


def sanitize(text: str, verdicts: tuple[str, ...] = (), control_tokens: bool = False) -> str:
    """Removes what would let text escape its tags or speak for the judge; with
    ``control_tokens`` (chat templates) also what would end its message."""
    text = _TAG.sub("", text)
    if control_tokens:
        text = _CONTROL.sub("", text)
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


def _parse(name: str, path: str, text: str, template_kwargs: dict) -> Template:
    header, _, body = text.partition("\n")
    body = body.rstrip("\n")
    if header.startswith("# verdicts:"):
        verdicts = tuple(header[len("# verdicts:") :].split())
        if len(verdicts) != 2:
            raise ValueError(f"{path}:1: expected two verdict strings, got {verdicts}")
        fields = {"verdicts": verdicts}
    elif header.startswith("# stop:"):
        stop, _, unchanged = header[len("# stop:") :].partition(" unchanged:")
        fields = {"stop": stop.strip()}
        if unchanged.strip():
            fields["unchanged"] = unchanged.strip()
        elif _:
            raise ValueError(f"{path}:1: 'unchanged:' names no marker")
    else:
        raise ValueError(
            f"{path}:1: a template starts with '# verdicts: X Y' or '# stop: S' (optionally "
            "followed by 'unchanged: U')"
        )
    if _SECTION.match(body):
        fields["sections"] = _sections(path, body)
        fields["template_kwargs"] = tuple(sorted(template_kwargs.items()))
    return Template(name, path, body, **fields)


def _sections(path: str, body: str) -> tuple[tuple[str, str], ...]:
    """A chat template's ``### role`` sections: system (optional), user, assistant (the prefill,
    last, may be empty)."""
    matches = list(_SECTION.finditer(body))
    sections = []
    for match, following in zip(matches, matches[1:] + [None]):
        end = following.start() if following else len(body)
        text = body[match.end() + 1 : end]
        sections.append((match.group(1), text.rstrip("\n") if following else text))
    roles = [role for role, _ in sections]
    if roles not in (["system", "user", "assistant"], ["user", "assistant"]):
        line = body[: matches[0].start()].count("\n") + 2
        raise ValueError(
            f"{path}:{line}: a chat template has the sections '### system' (optional), "
            f"'### user' and '### assistant' (the reply's prefill), in that order; got {roles}"
        )
    return tuple(sections)


@dataclasses.dataclass(frozen=True)
class PromptSet:
    templates: dict[str, Template]
    source: str
    calibration: Optional[str] = None
    """The pack's labelled calibration set (JSONL), if it ships one."""

    chat_endpoint: object = True
    """True when an OpenAI chat endpoint can send the pack's chat prompts; else why not."""

    @classmethod
    def load(cls, source: Optional[str] = None) -> PromptSet:
        """The pack ``source`` names (``--judge-prompt-dir``): a packaged pack (:data:`PACKS`;
        None is ``default``) or a directory."""
        source = source or "default"
        if source in PACKS:
            directory = Path(str(resources.files("megatron_sip.roles") / "prompts" / source))
        else:
            directory = Path(source)
            if not directory.is_dir():
                raise FileNotFoundError(
                    f"prompt pack {source}: neither a packaged pack ({', '.join(PACKS)}) nor a "
                    "directory"
                )
        settings = _pack_settings(directory)
        kwargs = settings.get("chat_template_kwargs", {})
        templates = {}
        for name, file in TEMPLATE_FILES.items():
            path = directory / file
            if path.is_file():
                templates[name] = _parse(name, str(path), path.read_text(), kwargs)
        if not templates:
            raise FileNotFoundError(
                f"{directory}: no prompt templates ({', '.join(TEMPLATE_FILES.values())})"
            )
        calibration = settings.get("calibration")
        if calibration is None and (directory / CALIBRATION_FILE).is_file():
            calibration = CALIBRATION_FILE
        if calibration is not None:
            calibration = str((directory / calibration).resolve())
            if not Path(calibration).is_file():
                raise FileNotFoundError(f"{directory / PACK_FILE}: no calibration {calibration}")
        return cls(
            templates,
            source if source in PACKS else str(directory),
            calibration,
            settings.get("chat_endpoint", True),
        )

    def __getitem__(self, name: str) -> Template:
        if name not in self.templates:
            raise KeyError(f"prompt pack {self.source} has no {TEMPLATE_FILES[name]}")
        return self.templates[name]

    @property
    def chat(self) -> bool:
        """Whether the pack's templates are chat templates (rendered by the model's own)."""
        return any(template.chat for template in self.templates.values())

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.templates):
            template = self.templates[name]
            digest.update(name.encode() + b"\0" + template.body.encode())
            if template.template_kwargs:
                digest.update(json.dumps(template.template_kwargs).encode())
        return digest.hexdigest()[:16]


def load_pack(source: Optional[str], flag: str) -> PromptSet:
    """:meth:`PromptSet.load` for a flag: a missing or malformed pack is a ConfigError naming it."""
    from megatron_sip.errors import ConfigError

    try:
        return PromptSet.load(source)
    except (OSError, ValueError) as error:
        raise ConfigError(flag, str(error)) from None


_PACK_KEYS = {"description": str, "chat_template_kwargs": dict, "calibration": str}


def _pack_settings(directory: Path) -> dict:
    """``pack.json``: description, chat_template_kwargs, calibration (a path relative to the
    pack), chat_endpoint (true, or why an OpenAI chat endpoint cannot send the pack)."""
    path = directory / PACK_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key, value in settings.items():
        if key == "chat_endpoint":
            if value is not True and not isinstance(value, str):
                raise ValueError(f"{path}: 'chat_endpoint' is true or a reason (a string)")
        elif key not in _PACK_KEYS:
            raise ValueError(f"{path}: unknown key {key!r} (known: chat_endpoint, "
                             f"{', '.join(_PACK_KEYS)})")  # fmt: skip
        elif not isinstance(value, _PACK_KEYS[key]):
            raise ValueError(f"{path}: {key!r} must be a {_PACK_KEYS[key].__name__}")
    return settings


def verdict_token_id(tokenizer, verdict: str) -> int:
    """The single token a verdict string is: a vocabulary entry (e.g. a SentencePiece user
    symbol, which ``tokenize`` would precede with a word-boundary piece) or one-token text."""
    vocab = getattr(tokenizer, "vocab", None) or {}  # a character tokenizer has no map
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


def stop_token_ids(template: Template, tokenizer) -> list[int]:
    """The token that ends a rewriter's reply early: its stop string when that is one token of
    the tokenizer (as the demo's ``</rewrite>`` symbol is), else none (decoding then runs to EOD
    or the token limit; the reply is cut at the stop string all the same)."""
    if not template.stop:
        return []
    try:
        return [verdict_token_id(tokenizer, template.stop)]
    except ValueError:
        return []


def encode_prompt(prompt, tokenizer) -> list[int]:
    """Token ids of a rendered prompt: a chat prompt's rendering holds its own special tokens
    (BOS), so none are added; a plain prompt is tokenized as any text."""
    if isinstance(prompt, Conversation):
        return tokenizer.tokenize_rendered(prompt.text(tokenizer))
    return tokenizer.tokenize(prompt)


def verdict_token_ids(template: Template, tokenizer) -> tuple[int, int]:
    """The token ids of the template's two verdicts at its answer position. A plain template's
    verdicts are vocabulary entries or one-token texts (:func:`verdict_token_id`); a chat
    template's are read in place: the verdict appended to a rendered prompt must add exactly one
    token, and the two verdicts different ones. Raises ValueError naming the template file."""
    if not template.chat:
        ids = tuple(verdict_token_id(tokenizer, verdict) for verdict in template.verdicts)
    else:
        text = template.example().text(tokenizer)
        base = tokenizer.tokenize_rendered(text)
        found = []
        for verdict in template.verdicts:
            full = tokenizer.tokenize_rendered(text + verdict)
            added = full[len(base) :]
            if full[: len(base)] != base or len(added) != 1:
                pieces = [tokenizer.detokenize([token]) for token in added]
                raise ValueError(
                    f"{template.path}: verdict {verdict!r} is {len(added)} tokens {pieces} at the "
                    "answer position for this tokenizer; verdict strings must be single tokens "
                    "there (choose words the model writes as one token, e.g. Yes/No, A/B)"
                )
            found += added
        ids = tuple(found)
    if ids[0] == ids[1]:
        raise ValueError(f"{template.path}: the two verdicts are the same token {ids[0]}")
    return ids


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
    the judge on such runs: ``--judge-window-rate`` of judge training). 0: judge the whole candidate
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

    def prefer_coherence(self, prefixes, firsts, seconds) -> list[Score]:
        _check_lengths(prefixes, firsts, seconds)
        if "coherence" not in self.prompts.templates:
            return super().prefer_coherence(prefixes, firsts, seconds)
        rendered = [
            self.render("coherence", prefix=p, a=a, b=b)
            for p, a, b in zip(prefixes, firsts, seconds)
        ]
        return self.verdicts("coherence", rendered)

    def safety(self, prefixes, texts) -> list[Score]:
        """The least P(safe) over the candidate's runs of sentences (see the class)."""
        _check_lengths(prefixes, texts)
        verdicts = self.prompts["safety"].markers
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
