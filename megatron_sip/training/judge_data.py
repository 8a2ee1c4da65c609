"""Labelled judging tasks -> the prompts a judge is trained on, with their verdicts.

The tasks are ``tools/build_demo_corpus.py``'s judge_*.jsonl schema (one JSON object a line):
``{"task": "safety" | "factuality", "prefix", "text", "label": 1 | 0}`` or ``{"task":
"pairwise", "prefix", "a", "b", "label": "a" | "b"}``. Each becomes the prompt the colocated
judge will see (same templates, same rendering); pairwise tasks are used in both orders. Judge
SFT trains on the verdict token, judge GRPO rewards sampled verdicts that match it.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from megatron_sip.data.appeals import APPEAL_FAMILIES, random_appeal_insertion
from megatron_sip.errors import ConfigError
from megatron_sip.roles.prompts import (
    SAFETY_WINDOW_SENTENCES,
    PromptSet,
    sentence_windows,
    verdict_token_id,
)

JUDGE_TASKS = ("safety", "factuality", "pairwise")


@dataclasses.dataclass
class JudgeDataConfig:
    """The judge's training data (the prompts are rendered with the judge's own settings:
    --judge-prompt-dir, --judge-max-prefix-chars, --judge-safety-window-sentences)."""

    judge_train_data: Optional[str] = None
    """Labelled judging tasks (jsonl: safety, factuality, pairwise) to train on."""

    judge_train_tasks: str = "safety,factuality,pairwise"
    """Comma-separated judging tasks to train on."""

    judge_distractor_rate: float = 0.5
    """Fraction of safety/factuality examples whose candidate gets, with the label unchanged,
    a clean sentence from another example (before or after it) or an appeal to the judge
    (data/appeals.py: any trained family, before, inside or after, glued or not): the judge
    learns that neither cancels a problem."""

    judge_held_out_appeals: str = "authority,emotional"
    """Comma-separated appeal families (data/appeals.py) kept out of training, to measure the
    judge on appeals it never saw."""

    judge_window_rate: float = 0.3
    """Fraction of safe-labelled safety examples whose candidate is replaced by a run of up to
    --judge-safety-window-sentences consecutive sentences of it (any part of a safe text is
    safe), so the judge knows the short texts that its conservative safety reading
    (``PromptedJudge.safety``) shows it; without them it mistakes many safe runs for unsafe."""

    judge_prefix_swap_rate: float = 0.0
    """Fraction of safety examples shown after another safety example's prefix, with the label
    unchanged (a continuation's safety is its own): where unsafe documents are toxic
    throughout, unsafe candidates come after toxic prefixes, and a judge trained without it
    learns to call whatever follows a toxic prefix unsafe."""

    judge_balance_safety: bool = False
    """Repeat the safe-labelled safety tasks (each copy with its own distractor, window and
    prefix draws) until they are as many as the unsafe ones. The judge reads a candidate
    conservatively (the lowest P(safe) over its runs of sentences): one run wrongly called unsafe
    makes the whole text unsafe, and a judge trained on mostly unsafe tasks leans that way."""

    def __post_init__(self):
        for name in ("judge_distractor_rate", "judge_window_rate", "judge_prefix_swap_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError("--" + name.replace("_", "-"), "must be in [0, 1]")
        unknown = set(self.tasks()) - set(JUDGE_TASKS)
        if unknown:
            raise ConfigError("--judge-train-tasks", f"unknown tasks {sorted(unknown)}")
        held_out = self.held_out_appeals()
        unknown = set(held_out) - set(APPEAL_FAMILIES)
        if unknown:
            raise ConfigError(
                "--judge-held-out-appeals",
                f"unknown appeal families {sorted(unknown)}; known: {sorted(APPEAL_FAMILIES)}",
            )
        if len(held_out) == len(APPEAL_FAMILIES) and self.judge_distractor_rate > 0:
            raise ConfigError("--judge-held-out-appeals", "holds out every appeal family")

    def tasks(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.judge_train_tasks.split(",") if t.strip())

    def held_out_appeals(self) -> tuple[str, ...]:
        return tuple(f.strip() for f in self.judge_held_out_appeals.split(",") if f.strip())

    def trained_appeals(self) -> tuple[str, ...]:
        held_out = set(self.held_out_appeals())
        return tuple(family for family in APPEAL_FAMILIES if family not in held_out)


@dataclasses.dataclass(frozen=True)
class VerdictExample:
    """One judge prompt with its correct verdict."""

    prompt: str
    verdict: str  # the correct one
    verdicts: tuple[str, str]  # the template's two
    task: str


def read_tasks(path: str, tasks: Sequence[str], flag: str = "--judge-train-data") -> list[dict]:
    """The labelled tasks of ``path`` whose task is in ``tasks``; a malformed line is a
    ConfigError naming the file and line."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise ConfigError(flag, f"cannot read {path}: {error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task = row["task"]
            if task == "pairwise":
                row["prefix"], row["a"], row["b"]  # noqa: B018 - the fields must exist
                ok = row["label"] in ("a", "b")
            else:
                row["prefix"], row["text"]  # noqa: B018
                ok = task in JUDGE_TASKS and row["label"] in (0, 1)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConfigError(flag, f"{path}:{number}: not a judging task ({error!r})") from None
        if not ok:
            raise ConfigError(flag, f"{path}:{number}: bad task or label in {line[:120]!r}")
        if task in tasks:
            rows.append(row)
    if not rows:
        raise ConfigError(flag, f"{path}: no tasks of {list(tasks)}")
    return rows


def _clean_sentences(examples: Sequence[dict]) -> list[str]:
    sentences = []
    for example in examples:
        if example["task"] in ("safety", "factuality") and example["label"] == 1:
            sentences += [s.strip() + "." for s in example["text"].split(". ") if len(s) > 20]
    return sentences


def verdict_examples(
    examples: Sequence[dict],
    prompts: PromptSet,
    max_prefix_chars: int,
    *,
    distractor_rate: float = 0.0,
    appeal_families: Sequence[str] = (),
    seed: int = 0,
    window_rate: float = 0.0,
    window_sentences: int = SAFETY_WINDOW_SENTENCES,
    prefix_swap_rate: float = 0.0,
    balance_safety: bool = False,
) -> list[VerdictExample]:
    """Every task as a prompt and its verdict; pairwise ones in both orders. A
    ``distractor_rate`` share of safety/factuality candidates gets (half the time each) a clean
    sentence of another example before or after it, or an appeal of ``appeal_families``
    anywhere; a ``window_rate`` share of safe safety candidates is cut to a run of sentences; a
    ``prefix_swap_rate`` share of safety candidates gets another safety task's prefix. With
    ``balance_safety`` the safe safety tasks come again (after all tasks, each copy with its own
    draws) until they match the unsafe ones in number."""
    rng = random.Random(seed)
    clean = _clean_sentences(examples) if distractor_rate > 0 else []
    safety_prefixes = [e["prefix"] for e in examples if e["task"] == "safety"]
    out = []
    for example in [*examples, *(_safe_repeats(examples) if balance_safety else [])]:
        task = example["task"]
        if task == "pairwise":
            template = prompts["quality"]
            better_first = example["label"] == "a"
            for a, b, first_wins in (
                (example["a"], example["b"], better_first),
                (example["b"], example["a"], not better_first),
            ):
                text = template.render(max_prefix_chars, prefix=example["prefix"], a=a, b=b)
                verdict = template.verdicts[0 if first_wins else 1]
                out.append(VerdictExample(text, verdict, template.verdicts, task))
            continue
        template = prompts[task]
        candidate = example["text"]
        if distractor_rate > 0 and rng.random() < distractor_rate:
            if appeal_families and (not clean or rng.random() < 0.5):
                candidate = random_appeal_insertion(rng, candidate, appeal_families)
            elif clean:
                extra = rng.choice(clean)
                candidate = f"{candidate} {extra}" if rng.random() < 0.5 else f"{extra} {candidate}"
        if task == "safety" and example["label"] and rng.random() < window_rate:
            candidate = rng.choice(sentence_windows(candidate, window_sentences, template.verdicts))
        prefix = example["prefix"]
        if task == "safety" and prefix_swap_rate > 0 and rng.random() < prefix_swap_rate:
            prefix = rng.choice(safety_prefixes)
        text = template.render(max_prefix_chars, prefix=prefix, candidate=candidate)
        verdict = template.verdicts[0 if example["label"] else 1]
        out.append(VerdictExample(text, verdict, template.verdicts, task))
    return out


def _safe_repeats(examples: Sequence[dict]) -> list[dict]:
    """Safe safety tasks, cycled, as many as the unsafe ones outnumber them."""
    safe = [e for e in examples if e["task"] == "safety" and e["label"] == 1]
    missing = sum(e["task"] == "safety" and e["label"] == 0 for e in examples) - len(safe)
    if not safe or missing <= 0:
        return []
    return [safe[i % len(safe)] for i in range(missing)]


def training_examples(
    data: JudgeDataConfig,
    prompts: PromptSet,
    max_prefix_chars: int,
    window_sentences: int,
    seed: int,
) -> list[VerdictExample]:
    """The verdict examples of a judge training run (judge SFT and judge GRPO alike)."""
    if not data.judge_train_data:
        raise ConfigError("--judge-train-data", "required: the labelled judging tasks")
    if prompts.chat:
        raise ConfigError(
            "--judge-prompt-dir",
            f"{prompts.source} is a chat pack (for instruct judges used as they are); judge "
            "training uses a plain pack such as 'default'",
        )
    rows = read_tasks(data.judge_train_data, data.tasks())
    return verdict_examples(
        rows,
        prompts,
        max_prefix_chars,
        distractor_rate=data.judge_distractor_rate,
        appeal_families=data.trained_appeals(),
        seed=seed,
        window_rate=data.judge_window_rate,
        window_sentences=window_sentences,
        prefix_swap_rate=data.judge_prefix_swap_rate,
        balance_safety=data.judge_balance_safety,
    )


def training_verdict_id(tokenizer, verdict: str) -> int:
    """The verdict's token id; a verdict the tokenizer splits is a ConfigError naming the
    tokenizer (a trained judge answers in one token)."""
    try:
        return verdict_token_id(tokenizer, verdict)
    except ValueError as error:
        raise ConfigError("--tokenizer-model", str(error)) from None
