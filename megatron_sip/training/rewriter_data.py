"""(prefix, original, rewrite) triples -> the prompts and targets a rewriter is trained on.

The triples are ``tools/build_demo_corpus.py``'s rewriter_sft.jsonl schema (one JSON object a
line): ``{"prefix", "original", "rewrite"}`` (its ``id`` and ``kind`` are not read; for clean text
the rewrite is the original). Each becomes the prompt the colocated rewriter
(``roles/megatron_backend.py``, ``MegatronRewriter``) will see, rendered by the same template with
the same settings, and a target: the rewrite followed by the template's stop string. The rewriter
cuts its generation at the first stop string and strips what comes before, so a model trained on
these targets writes the rewrite and then closes it. Rewriter SFT trains on the target tokens.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import torch

from megatron_sip.errors import ConfigError
from megatron_sip.roles.config import RewriterPromptConfig
from megatron_sip.roles.prompts import Template, encode_prompt, load_pack
from megatron_sip.training.epochs import shuffled_groups

TRIPLE_FIELDS = ("prefix", "original", "rewrite")


@dataclasses.dataclass
class RewriterDataConfig:
    """The rewriter's training data (the prompts are rendered with the rewriter's own settings:
    --rewriter-prompt-dir, --rewriter-max-prefix-chars)."""

    rewriter_train_data: Optional[str] = None
    """(prefix, original, rewrite) triples (jsonl, as tools/build_demo_corpus.py's
    rewriter_sft.jsonl) to train on."""


@dataclasses.dataclass(frozen=True)
class RewriteTriple:
    """One line of the training data."""

    prefix: str
    original: str
    rewrite: str
    source: str  # "path:line", for errors


@dataclasses.dataclass(frozen=True)
class RewriteExample:
    """One rewriter prompt with the text the rewriter should generate after it."""

    prompt: str
    target: str  # the rewrite, then the stop string
    stop: str  # the template's, where the rewriter cuts its output
    source: str


@dataclasses.dataclass(frozen=True)
class EncodedRewrite:
    """A prompt and target as token ids that fit a training sequence."""

    ids: list[int]
    target_start: int  # ids[target_start:] are the target's tokens
    target_cut: bool  # the target alone did not fit and lost its end


def read_triples(path: str, flag: str = "--rewriter-train-data") -> list[RewriteTriple]:
    """The triples of ``path``; a malformed line is a ConfigError naming the file and line."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise ConfigError(flag, f"{path}: cannot read it ({error})") from None
    triples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
            values = [row[name] for name in TRIPLE_FIELDS]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConfigError(flag, f"{where}: not a rewriting triple ({error!r})") from None
        if not all(isinstance(value, str) for value in values):
            raise ConfigError(
                flag, f"{where}: {', '.join(TRIPLE_FIELDS)} must be strings in {line[:120]!r}"
            )
        triples.append(RewriteTriple(*values, source=where))
    if not triples:
        raise ConfigError(flag, f"{path}: no rewriting triples")
    return triples


def rewrite_examples(
    triples: Sequence[RewriteTriple], template: Template, max_prefix_chars: int
) -> list[RewriteExample]:
    """Each triple as the prompt ``MegatronRewriter.rewrite`` renders for (prefix, original) and
    its target: the rewrite, stripped as the rewriter strips its output (the template's unchanged
    marker where it is the original), then the stop string."""
    if not template.stop:
        raise ConfigError(
            "--rewriter-prompt-dir",
            f"{template.path} names no stop string ('# stop: S'): a rewriter trained on it could "
            "not end its rewrite",
        )
    examples = []
    for triple in triples:
        rewrite = triple.rewrite.strip()
        if template.stop in rewrite:
            # The rewriter's output is cut at the first stop string: this target cannot be written.
            raise ConfigError(
                "--rewriter-train-data",
                f"{triple.source}: the rewrite contains the stop string {template.stop!r}",
            )
        if template.unchanged and rewrite == triple.original.strip():
            # The rewriter answers that nothing changes; the backend returns the original.
            rewrite = template.unchanged
        prompt = template.render(max_prefix_chars, prefix=triple.prefix, suffix=triple.original)
        examples.append(
            RewriteExample(prompt, rewrite + template.stop, template.stop, triple.source)
        )
    return examples


def rewrite_template(prompt_dir: Optional[str]) -> Template:
    """The rewrite template of ``--rewriter-prompt-dir`` (a plain pack)."""
    prompts = load_pack(prompt_dir, "--rewriter-prompt-dir")
    if prompts.chat:
        raise ConfigError(
            "--rewriter-prompt-dir",
            f"{prompts.source} is a chat pack (for instruct rewriters used as they are); rewriter "
            "training uses a plain pack such as 'default'",
        )
    try:
        return prompts["rewrite"]
    except KeyError as error:
        raise ConfigError("--rewriter-prompt-dir", str(error.args[0])) from None


def training_examples(
    data: RewriterDataConfig, prompts: RewriterPromptConfig
) -> list[RewriteExample]:
    """The (prompt, target) examples of a rewriter training run."""
    if not data.rewriter_train_data:
        raise ConfigError("--rewriter-train-data", "required: the rewriting triples")
    template = rewrite_template(prompts.rewriter_prompt_dir)
    triples = read_triples(data.rewriter_train_data)
    return rewrite_examples(triples, template, prompts.rewriter_max_prefix_chars)


def _target_ids(example: RewriteExample, tokenizer) -> list[int]:
    """The target's tokens as the rewriter generates them: after the prompt, without the BOS a
    tokenizer may put before every text; they must decode to text holding the stop string,
    else the rewriter could never close a rewrite."""
    ids = tokenizer.tokenize(example.target)
    if ids and ids[0] == tokenizer.bos >= 0:
        ids = ids[1:]
    decoded, stop = tokenizer.detokenize(ids), example.stop
    if stop not in decoded:
        raise ConfigError(
            "--tokenizer-model",
            f"{example.source}: the stop string {stop!r} does not survive this tokenizer (the "
            f"target decodes to ...{decoded[-40:]!r}), so the rewriter could never end a "
            "rewrite; use a tokenizer that writes it (for SentencePiece, train it with "
            f"--user-defined-symbols {stop!r})",
        )
    return ids


def encode_examples(
    examples: Sequence[RewriteExample], tokenizer, seq_length: int
) -> list[EncodedRewrite]:
    """Prompt and target tokens of every example in one training sequence: the prompt is cut on
    the left to make room for the target (the rewriter also keeps a prompt's end); a target
    longer than the sequence is cut on the right (``target_cut``) after one prompt token, which
    its first token is predicted from."""
    encoded = []
    for example in examples:
        prompt = encode_prompt(example.prompt, tokenizer)
        target = _target_ids(example, tokenizer)
        # seq_length + 1 ids: the inputs are ids[:-1], the labels ids[1:].
        kept_target = target[:seq_length]
        kept_prompt = prompt[-(seq_length + 1 - len(kept_target)) :]
        encoded.append(
            EncodedRewrite(
                kept_prompt + kept_target, len(kept_prompt), len(kept_target) < len(target)
            )
        )
    return encoded


def rewrite_batches(
    encoded: Sequence[EncodedRewrite],
    *,
    seq_length: int,
    micro_batch_size: int,
    seed: int,
    device=None,
    skip: int = 0,
) -> Iterator[dict]:
    """Endless micro-batches in a seeded order (after the first ``skip``, those a resumed run
    has trained on): each row is a prompt and its target, right-padded, whose loss positions are
    those that predict the target's tokens."""
    if len(encoded) < micro_batch_size:
        raise ConfigError(
            "--micro-batch-size",
            f"{micro_batch_size} is more than the {len(encoded)} rewriting examples",
        )
    return _endless_batches(encoded, seq_length, micro_batch_size, seed, device, skip)


def _endless_batches(encoded, seq_length, micro_batch_size, seed, device, skip) -> Iterator[dict]:
    for rows in shuffled_groups(encoded, micro_batch_size, seed, skip):
        batch = _micro_batch(rows, seq_length)
        yield {k: v.to(device) if device is not None else v for k, v in batch.items()}


def _micro_batch(rows: Sequence[EncodedRewrite], seq_length: int) -> dict:
    tokens = torch.zeros(len(rows), seq_length, dtype=torch.long)
    labels = torch.zeros_like(tokens)
    loss_mask = torch.zeros(len(rows), seq_length)
    for row, example in enumerate(rows):
        ids = torch.as_tensor(example.ids)
        tokens[row, : len(ids) - 1] = ids[:-1]
        labels[row, : len(ids) - 1] = ids[1:]
        # Position j predicts ids[j + 1]: the target's tokens from the prompt's last one on.
        loss_mask[row, example.target_start - 1 : len(ids) - 1] = 1.0
    positions = torch.arange(seq_length).expand(len(rows), -1)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": positions}
