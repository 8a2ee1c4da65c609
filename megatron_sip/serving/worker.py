"""The model calls the server makes, run alike on every model-parallel rank.

Three calls cover the API: the next token after each prompt (the judge's path: one forward,
``RoleModel.next_token_log_probs``, the colocated judge's numbers exactly), generation of several
tokens (the rollout engine, ``generate``), and scoring given sequences (log-probabilities of each
token after its prefix, for ``echo`` and for the log-probabilities of generated tokens). Every
log-probability reported is the model's full-vocabulary, temperature-1 log-softmax; sampling
settings only decide which token is drawn.

With tensor or pipeline parallelism each call is collective. Rank 0 decides what to run (it
holds the HTTP server and the scheduler) and broadcasts each call as a small picklable op before
running it; the other ranks follow (:meth:`OpChannel.follow`) until rank 0 sends ``STOP``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Hashable, Sequence
from typing import Optional, Union

import torch
import torch.distributed as dist

from megatron_sip.inference.generation import generate
from megatron_sip.inference.pipeline import broadcast_from_last_stage, pipeline_forward
from megatron_sip.inference.sampling import SamplingConfig, sample

logger = logging.getLogger(__name__)

GREEDY_BELOW = 1e-5
"""Temperatures below this are greedy (as vLLM): dividing logits by them overflows."""


# -- what one prompt asks for (payloads of scheduler items) ----------------------------------


@dataclasses.dataclass(frozen=True)
class NextTokenRow:
    """One token after ``prompt``, drawn with this row's settings and seed."""

    prompt: tuple[int, ...]
    top: int
    temperature: float
    top_p: float
    seed: int


@dataclasses.dataclass(frozen=True)
class GenerateRow:
    prompt: tuple[int, ...]
    seed: int


@dataclasses.dataclass(frozen=True)
class ScoreRow:
    """Log-probabilities of ``sequence[start + 1:]``, each after the tokens before it."""

    sequence: tuple[int, ...]
    start: int
    top: int


NEXT_TOKEN = "next_token"
SCORE = "score"


@dataclasses.dataclass(frozen=True)
class GenerateKey:
    """Generation prompts that can share one ``generate`` call: same length and sampling.
    ``owner`` keeps a seeded sampled request's prompts to themselves, so its answer does not
    depend on what else the server runs."""

    max_tokens: int
    temperature: float
    top_p: float
    owner: Optional[int] = None


# -- ops: one model call, as broadcast to every rank -----------------------------------------


@dataclasses.dataclass(frozen=True)
class NextTokenOp:
    rows: tuple[NextTokenRow, ...]


@dataclasses.dataclass(frozen=True)
class GenerateOp:
    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int


@dataclasses.dataclass(frozen=True)
class ScoreOp:
    rows: tuple[ScoreRow, ...]


Op = Union[NextTokenOp, GenerateOp, ScoreOp]
STOP = "stop"
IDLE = "idle"


def build_op(key: Hashable, payloads: Sequence) -> Op:
    """The model call for a scheduler batch of ``key``."""
    if key == NEXT_TOKEN:
        return NextTokenOp(tuple(payloads))
    if key == SCORE:
        return ScoreOp(tuple(payloads))
    if isinstance(key, GenerateKey):
        return GenerateOp(
            prompts=tuple(row.prompt for row in payloads),
            max_tokens=key.max_tokens,
            temperature=key.temperature,
            top_p=key.top_p,
            seed=payloads[0].seed,
        )
    raise ValueError(f"no model call for key {key!r}")


# -- results --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenScores:
    """A token at one position: its log-probability and the ``top`` most likely tokens there."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _sampling(temperature: float, top_p: float) -> SamplingConfig:
    return SamplingConfig(sip_temperature=temperature, sip_top_p=top_p)


class ModelWorker:
    """Runs ops on a ``RoleModel`` (any object with ``module``, ``tokenizer``, ``device`` and
    ``next_token_log_probs``)."""

    def __init__(self, role):
        self.role = role
        self.vocab_size = role.tokenizer.vocab_size  # ids past it are the TP padding
        self.eod = role.tokenizer.eod

    @torch.no_grad()
    def run(self, op: Op) -> list:
        if isinstance(op, NextTokenOp):
            return self._next_token(op)
        if isinstance(op, GenerateOp):
            return self._generate(op)
        if isinstance(op, ScoreOp):
            return self._score(op)
        raise TypeError(f"not an op: {op!r}")

    def _top(self, log_probs: torch.Tensor, k: int) -> tuple[list, list]:
        """Top-``k`` values and ids over the last dimension, as lists (empty when k is 0)."""
        if k <= 0:
            return [], []
        values, indices = torch.topk(log_probs[..., : self.vocab_size], min(k, self.vocab_size))
        return values.tolist(), indices.tolist()

    def _next_token(self, op: NextTokenOp) -> list[TokenScores]:
        log_probs = self.role.next_token_log_probs([list(row.prompt) for row in op.rows])
        tokens = log_probs[:, : self.vocab_size].argmax(dim=-1)
        for i, row in enumerate(op.rows):
            if row.temperature >= GREEDY_BELOW:
                generator = torch.Generator(device=log_probs.device).manual_seed(row.seed)
                drawn, _ = sample(
                    log_probs[i : i + 1], _sampling(row.temperature, row.top_p), generator,
                    self.vocab_size,
                )  # fmt: skip
                tokens[i] = drawn[0]
        chosen = log_probs.gather(-1, tokens[:, None])[:, 0].tolist()
        values, indices = self._top(log_probs, max(row.top for row in op.rows))
        out = []
        for i, (row, token) in enumerate(zip(op.rows, tokens.tolist())):
            top = tuple(zip(indices[i][: row.top], values[i][: row.top])) if values else ()
            out.append(TokenScores(token, chosen[i], top))
        return out

    def _generate(self, op: GenerateOp) -> list[list[int]]:
        """New tokens per prompt, cut after the first end-of-document token."""
        rollouts = generate(
            self.role.module,
            [list(prompt) for prompt in op.prompts],
            num_samples=1,
            num_tokens=op.max_tokens,
            sampling=_sampling(op.temperature, op.top_p),
            seed=op.seed,
            eod=self.eod,
            vocab_size=self.vocab_size,
            device=self.role.device,
        )
        return [rows[0] for rows in rollouts.as_candidates()]

    def _score(self, op: ScoreOp) -> list[list[TokenScores]]:
        """Right-padded sequences in one forward (causal attention makes the padding exact)."""
        device, rows = self.role.device, op.rows
        length = max(len(row.sequence) for row in rows)
        tokens = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            tokens[i, : len(row.sequence)] = torch.as_tensor(row.sequence, device=device)
        positions = torch.arange(length, device=device).expand_as(tokens)
        top = max(row.top for row in rows)
        width = max(1, min(top, self.vocab_size))
        chosen = torch.zeros(len(rows), length - 1, device=device)
        values = torch.zeros(len(rows), length - 1, width, device=device)
        indices = torch.zeros(len(rows), length - 1, width, dtype=torch.long, device=device)
        logits = pipeline_forward(self.role.module, tokens, positions, runtime_gather_output=True)
        if logits is not None:  # the last pipeline stage
            logits = logits[:, :-1].float()
            logits[..., self.vocab_size :] = float("-inf")
            log_probs = torch.log_softmax(logits, dim=-1)
            chosen = log_probs.gather(-1, tokens[:, 1:, None])[..., 0].contiguous()
            if top > 0:
                values, indices = torch.topk(log_probs[..., : self.vocab_size], width)
                values, indices = values.contiguous(), indices.contiguous()
        group = self.role.module.pg_collection.pp
        chosen = broadcast_from_last_stage(chosen, group).tolist()
        if top > 0:
            values = broadcast_from_last_stage(values, group).tolist()
            indices = broadcast_from_last_stage(indices, group).tolist()
        out = []
        for i, row in enumerate(rows):
            scores = []
            for position in range(row.start, len(row.sequence) - 1):
                pairs = ()
                if row.top > 0:
                    pairs = tuple(
                        zip(indices[i][position][: row.top], values[i][position][: row.top])
                    )
                scores.append(TokenScores(row.sequence[position + 1], chosen[i][position], pairs))
            out.append(scores)
        return out


class OpChannel:
    """Rank 0's model calls, made by every rank of the model-parallel world alike.

    Rank 0 broadcasts each op (``broadcast_object_list``) before running it; followers receive
    and run them until ``STOP``. While idle, rank 0 sends ``IDLE`` now and then, so that a
    follower's pending broadcast never reaches the process group's timeout."""

    def __init__(self, worker: ModelWorker, world_size: int, heartbeat_s: float = 30.0):
        self.worker = worker
        self.world_size = world_size
        self.heartbeat_s = heartbeat_s
        self._last_sent = time.monotonic()

    def _broadcast(self, message) -> object:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        self._last_sent = time.monotonic()
        return box[0]

    def run(self, op: Op) -> list:
        """Rank 0: every rank runs ``op``; its results here."""
        if self.world_size > 1:
            self._broadcast(op)
        return self.worker.run(op)

    def execute(self, key: Hashable, payloads: list) -> list:
        """The scheduler's model call."""
        return self.run(build_op(key, payloads))

    def idle(self) -> None:
        """Rank 0, nothing to run: a heartbeat when one is due."""
        if self.world_size > 1 and time.monotonic() - self._last_sent > self.heartbeat_s:
            self._broadcast(IDLE)

    def stop(self) -> None:
        """Rank 0, shutting down: the followers return from :meth:`follow`."""
        if self.world_size > 1:
            self._broadcast(STOP)

    def follow(self) -> None:
        """Ranks other than 0: run what rank 0 sends until it says stop."""
        while True:
            op = self._broadcast(None)
            if op == STOP:
                return
            if op == IDLE:
                continue
            try:
                self.worker.run(op)
            except Exception:  # rank 0 fails the same call and answers its requests with 500
                logger.exception("a model call failed on this rank")
