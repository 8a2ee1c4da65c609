"""Requests -> model work -> OpenAI answers, with the tokenizer and no model.

A request becomes a :class:`Job`: its prompts tokenized, the model work for the new tokens
(:meth:`Job.first_works`) and, when log-probabilities of given tokens are asked for (``echo``, or
the generated tokens of a longer completion), the scoring work (:meth:`Job.score_works`). The
scheduler runs the work; :class:`CompletionEngine` turns the results into the completions or chat
answer. Everything here runs on request threads; nothing touches the model.

Numbers and texts follow the earlier standard-library server exactly: log-probabilities are the
full-vocabulary temperature-1 log-softmax (-inf reported as -9999, as vLLM, since JSON has no
-inf); a token's text is its detokenized form, a SentencePiece piece with its leading "▁" as a
space; generation ends at the end-of-document token (kept, ``finish_reason: "stop"``) or at the
first stop string (cut before it; the tokens that start before it stay), else ``"length"``.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import time
import uuid
from typing import Optional

from megatron_sip.data.tokenizers import GPTSentencePieceTokenizer, decode_continuation
from megatron_sip.serving.protocol import ChatCompletionRequest, CompletionRequest, RequestError
from megatron_sip.serving.scheduler import Work
from megatron_sip.serving.worker import (
    GREEDY_BELOW,
    NEXT_TOKEN,
    SCORE,
    GenerateKey,
    GenerateRow,
    NextTokenRow,
    ScoreRow,
    TokenScores,
)

MIN_LOGPROB = -9999.0
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_owners = itertools.count(1)


def _finite(value: float) -> float:
    return value if value > MIN_LOGPROB else MIN_LOGPROB


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a request's prompts are continued."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: tuple[str, ...]
    top: Optional[int]
    """Alternatives per position; None: no log-probabilities at all."""
    echo: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclasses.dataclass
class Choice:
    """One prompt's answer."""

    prompt: list[int]
    prompt_text: str
    tokens: list[int] = dataclasses.field(default_factory=list)
    """The new tokens kept (an ending end-of-document token included)."""
    text: str = ""
    finish_reason: str = "length"
    scores: list[TokenScores] = dataclasses.field(default_factory=list)
    """Per kept token, when log-probabilities were asked for."""
    prompt_scores: list[TokenScores] = dataclasses.field(default_factory=list)
    """Per prompt token after the first, with ``echo``."""


class Job:
    """One request's prompts on their way through the model."""

    def __init__(self, engine: CompletionEngine, prompts: list[list[int]], texts, settings):
        self.engine = engine
        self.settings = settings
        self.choices = [Choice(prompt, text) for prompt, text in zip(prompts, texts)]
        self.created = int(time.time())
        self._owner = next(_owners)

    def _seed(self, index: int) -> int:
        seed = self.settings.seed
        return seed + index if seed is not None else random.randrange(2**31)

    def first_works(self) -> list[Work]:
        """The new tokens' model work: none (max_tokens 0), one next-token call per prompt
        (max_tokens 1: the judge's path), or generation."""
        s = self.settings
        if s.max_tokens == 0:
            return []
        temperature = 0.0 if s.greedy else s.temperature
        top_p = 1.0 if s.greedy else s.top_p
        if s.max_tokens == 1:
            rows = [
                NextTokenRow(tuple(c.prompt), s.top or 0, temperature, top_p, self._seed(i))
                for i, c in enumerate(self.choices)
            ]
            return [Work(NEXT_TOKEN, row, len(row.prompt)) for row in rows]
        owner = self._owner if s.seed is not None and not s.greedy else None
        key = GenerateKey(s.max_tokens, temperature, top_p, owner)
        return [
            Work(key, GenerateRow(tuple(c.prompt), self._seed(i)), len(c.prompt) + s.max_tokens)
            for i, c in enumerate(self.choices)
        ]

    def take_first(self, results: list) -> None:
        """The new tokens (and, on the judge's path, their scores); then the texts."""
        for i, choice in enumerate(self.choices):
            if not results:
                new: list[int] = []
            elif isinstance(results[i], TokenScores):
                new = [results[i].token]
                choice.scores = [results[i]]
            else:
                new = list(results[i])
            self.engine.finish(choice, new, self.settings.stop)

    def _score_rows(self) -> list[Optional[ScoreRow]]:
        s = self.settings
        rows: list[Optional[ScoreRow]] = []
        for choice in self.choices:
            sequence = choice.prompt + (choice.tokens if s.max_tokens > 1 else [])
            start = 0 if s.echo else len(choice.prompt) - 1
            wanted = s.top is not None and len(sequence) - 1 > start
            rows.append(ScoreRow(tuple(sequence), start, s.top) if wanted else None)
        return rows

    def score_works(self) -> list[Work]:
        """Scoring of the prompt (``echo``) and of generated tokens, when log-probs are asked
        for and the first calls did not give them."""
        return [Work(SCORE, row, len(row.sequence)) for row in self._score_rows() if row]

    def take_scores(self, results: list) -> None:
        results = iter(results)
        for choice, row in zip(self.choices, self._score_rows()):
            if row is None:
                continue
            scores = next(results)
            split = len(choice.prompt) - 1 - row.start  # positions before: prompt tokens
            choice.prompt_scores = scores[:split]
            if self.settings.max_tokens > 1:
                choice.scores = scores[split:]

    def usage(self) -> dict:
        prompt_tokens = sum(len(c.prompt) for c in self.choices)
        completion_tokens = sum(len(c.tokens) for c in self.choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }


class CompletionEngine:
    """Tokenizes requests into jobs and formats jobs into OpenAI answers."""

    def __init__(
        self,
        tokenizer,
        model_name: str,
        seq_length: int,
        max_tokens_limit: int,
        max_prompts_per_request: int,
    ):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.seq_length = seq_length
        self.max_tokens_limit = max_tokens_limit
        self.max_prompts_per_request = max_prompts_per_request
        self.eod = tokenizer.eod
        self._texts: dict[int, str] = {}

    # -- text of tokens -------------------------------------------------------------------------

    def token_text(self, token: int) -> str:
        """One token as text: the detokenized token; for SentencePiece its piece with the
        leading "▁" as a space (user-defined symbols such as ``[[A]]`` stay as they are)."""
        text = self._texts.get(token)
        if text is None:
            text = self.tokenizer.detokenize([token])
            if isinstance(self.tokenizer, GPTSentencePieceTokenizer):
                piece = self.tokenizer.inv_vocab.get(token, text)
                if not _BYTE_PIECE.fullmatch(piece):
                    text = piece.replace("\u2581", " ")
            self._texts[token] = text
        return text

    def continuation(self, context: list[int], new: list[int]) -> str:
        """The text ``new`` adds after ``context``."""
        return decode_continuation(self.tokenizer, context, new)

    def offsets(self, context: list[int], tokens: list[int], start: int) -> list[int]:
        """Character offset of each token in the text it detokenizes to after ``context``."""
        offsets, position, history = [], start, list(context)
        for token in tokens:
            offsets.append(position)
            if token != self.eod:
                position += len(self.continuation(history, [token]))
            history.append(token)
        return offsets

    def finish(self, choice: Choice, new: list[int], stops: tuple[str, ...]) -> None:
        """Sets a choice's text, kept tokens and finish reason from its new tokens."""
        finish = "stop" if new and new[-1] == self.eod else "length"
        content = new[:-1] if finish == "stop" else new
        text = self.continuation(choice.prompt, content) if content else ""
        found = [at for at in (text.find(stop) for stop in stops) if at != -1]
        if found:
            # A stop string ends the text; the tokens that start before it stay.
            cut, finish = min(found), "stop"
            text = text[:cut]
            offsets = self.offsets(choice.prompt, content, 0)
            new = [token for token, offset in zip(content, offsets) if offset < cut]
            choice.scores = choice.scores[: len(new)]
        choice.tokens, choice.text, choice.finish_reason = new, text, finish

    # -- requests -> jobs -----------------------------------------------------------------------

    def _check_max_tokens(self, max_tokens: int, field: str) -> None:
        if max_tokens > self.max_tokens_limit:
            raise RequestError(
                400, f"'{field}' must be at most {self.max_tokens_limit} on this server "
                f"(--max-tokens-limit), got {max_tokens}", field,
            )  # fmt: skip

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        rendered = getattr(self.tokenizer, "tokenize_rendered", None)
        if not add_special_tokens and rendered is not None:
            return rendered(text)
        return self.tokenizer.tokenize(text)

    def completion_job(self, request: CompletionRequest) -> Job:
        texts = request.prompts()
        if len(texts) > self.max_prompts_per_request:
            raise RequestError(
                400, f"'prompt' holds {len(texts)} prompts; this server takes at most "
                f"{self.max_prompts_per_request} per request (--max-prompts-per-request)",
                "prompt",
            )  # fmt: skip
        max_tokens = 16 if request.max_tokens is None else request.max_tokens
        self._check_max_tokens(max_tokens, "max_tokens")
        # As the colocated roles: a judge prompt keeps its last seq-length tokens, a generation
        # prompt leaves room for the new tokens.
        limit = self.seq_length if max_tokens <= 1 else self.seq_length - max_tokens
        prompts = []
        for index, text in enumerate(texts):
            try:
                ids = self._encode(text, request.add_special_tokens)[-limit:]
            except ValueError as error:  # e.g. NullTokenizer given words
                raise RequestError(400, f"'prompt': prompt {index}: {error}", "prompt") from None
            if not ids:
                raise RequestError(
                    400, f"'prompt': prompt {index} is empty after tokenization", "prompt"
                )
            prompts.append(ids)
        settings = Settings(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
            stop=request.stop_strings(),
            top=request.logprobs,
            echo=bool(request.echo),
        )
        return Job(self, prompts, texts, settings)

    def render_chat(self, request: ChatCompletionRequest) -> str:
        render = getattr(self.tokenizer, "render_chat", None)
        if render is None or getattr(self.tokenizer, "chat_template", None) is None:
            raise RequestError(
                400, f"this model has no chat template (its {type(self.tokenizer).__name__} "
                "has none): send a rendered prompt to /v1/completions instead", "messages",
            )  # fmt: skip
        from jinja2.exceptions import TemplateError

        try:
            return render(
                [message.as_dict() for message in request.messages],
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                **(request.chat_template_kwargs or {}),
            )
        except (TemplateError, ValueError) as error:
            raise RequestError(
                400, f"the chat template could not render 'messages': {error}", "messages"
            ) from None

    def chat_job(self, request: ChatCompletionRequest) -> Job:
        text = self.render_chat(request)
        prompt = self.tokenizer.tokenize_rendered(text)
        if not prompt:
            raise RequestError(400, "'messages' render to no tokens", "messages")
        requested = request.requested_max_tokens()
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        room = self.seq_length - len(prompt)
        if requested is None:
            max_tokens = min(self.max_tokens_limit, room)
            if max_tokens < 1:
                raise RequestError(
                    400, f"'messages' render to {len(prompt)} tokens, which fill the model's "
                    f"sequence length {self.seq_length}", "messages",
                )  # fmt: skip
        else:
            max_tokens = requested
            self._check_max_tokens(max_tokens, field)
            if len(prompt) + (max_tokens if max_tokens > 1 else 0) > self.seq_length:
                raise RequestError(
                    400, f"'messages' render to {len(prompt)} tokens; with {field} "
                    f"{max_tokens} that exceeds the model's sequence length {self.seq_length}",
                    "messages",
                )  # fmt: skip
        settings = Settings(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
            stop=request.stop_strings(),
            top=(request.top_logprobs or 0) if request.logprobs else None,
        )
        return Job(self, [prompt], [text], settings)

    # -- jobs -> answers ------------------------------------------------------------------------

    def _top_dict(self, scores: TokenScores) -> dict[str, float]:
        entry: dict[str, float] = {}
        for token, value in scores.top:
            entry.setdefault(self.token_text(token), _finite(value))
        entry.setdefault(self.token_text(scores.token), _finite(scores.logprob))
        return entry

    def _completion_logprobs(self, choice: Choice, echo: bool) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}  # fmt: skip
        if echo:
            out["tokens"] += [self.token_text(t) for t in choice.prompt]
            out["text_offset"] += self.offsets([], choice.prompt, 0)
            out["token_logprobs"] += [None] + [_finite(s.logprob) for s in choice.prompt_scores]
            out["top_logprobs"] += [None] + [self._top_dict(s) for s in choice.prompt_scores]
        if choice.tokens:
            out["tokens"] += [self.token_text(t) for t in choice.tokens]
            out["token_logprobs"] += [_finite(s.logprob) for s in choice.scores]
            out["top_logprobs"] += [self._top_dict(s) for s in choice.scores]
            out["text_offset"] += self.offsets(
                choice.prompt, choice.tokens, len(choice.prompt_text)
            )
        return out

    def completion_response(self, job: Job) -> dict:
        choices = []
        for index, choice in enumerate(job.choices):
            answer = {
                "index": index,
                "text": choice.text,
                "finish_reason": choice.finish_reason,
                "logprobs": None,
            }
            if job.settings.top is not None:
                answer["logprobs"] = self._completion_logprobs(choice, job.settings.echo)
            if job.settings.echo:
                answer["text"] = choice.prompt_text + choice.text
            choices.append(answer)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": job.created,
            "model": self.model_name,
            "choices": choices,
            "usage": job.usage(),
        }

    def _chat_token(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    def chat_response(self, job: Job) -> dict:
        choice = job.choices[0]
        logprobs = None
        if job.settings.top is not None:
            logprobs = {"content": [
                {**self._chat_token(s.token, s.logprob),
                 "top_logprobs": [self._chat_token(t, v) for t, v in s.top]}
                for s in choice.scores
            ]}  # fmt: skip
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": job.created,
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": choice.text},
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                }
            ],
            "usage": job.usage(),
        }
