"""Judge and rewriter served by an OpenAI-compatible server: ``/v1/completions`` or
``/v1/chat/completions``, through the official ``openai`` client.

Any server that speaks the OpenAI API works: ``tools/serve_judge.py`` (a Megatron checkpoint),
vLLM, SGLang. Prompts come from the same prompt packs as the colocated backend
(``--judge-prompt-dir``):

- ``--judge-endpoint completions`` sends text, many prompts per request
  (``--judge-prompts-per-request``). A chat pack is rendered here with the model's own chat template
  (``--judge-tokenizer``: the model's tokenizer directory) and sent with ``add_special_tokens:
  false`` (vLLM's extension; the rendering holds its BOS already).
- ``--judge-endpoint chat`` sends a chat pack's messages, one conversation per request; a prefill
  is sent as a final assistant message with ``continue_final_message: true`` and
  ``add_generation_prompt: false``, the pack's template variables as ``chat_template_kwargs``
  (vLLM's extensions).

The judge asks for one greedy token with the top-20 log-probabilities and reads its verdict as the
colocated judge does: P(positive) = softmax over the two verdict strings' log-probabilities at the
answer position. A server that returns no log-probabilities, or whose top-20 misses a verdict,
falls back to a strict parse of the generated text (exactly one verdict string -> 1 or 0); an answer
with neither is an unparsed verdict, counted and logged with what the model said.

Requests run ``concurrency`` at a time on the client's own event loop. The ``openai`` client gives
bearer auth, per-read timeouts and retries with exponential backoff on connection errors, timeouts,
408/409/429 and 5xx (honouring ``Retry-After``); on top of it every request has a deadline over all
its attempts, so a server that drips its answer cannot hold a step: ``timeout * (retries + 1)``
plus at most 8 s of backoff per retry. Failures never raise: whatever still fails is ``None`` for
its prompts, a missing score; ``stats`` counts requests, failures by kind and unparsed verdicts, and
each failure kind is logged once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import threading
from collections.abc import Sequence
from typing import Optional

from megatron_sip.errors import ConfigError
from megatron_sip.roles.base import Rewriter, Score, _check_lengths
from megatron_sip.roles.config import ENDPOINTS, require_setting
from megatron_sip.roles.prompts import (
    SAFETY_WINDOW_SENTENCES,
    Conversation,
    PromptedJudge,
    PromptSet,
    Template,
    load_pack,
    verdict_token_ids,
)

logger = logging.getLogger(__name__)

JUDGE_TOP_LOGPROBS = 20
MAX_RETRY_BACKOFF_S = 8.0  # the openai client's longest wait between attempts (without Retry-After)
_LOGGED_EXAMPLES = 3  # unparsed verdicts logged in full, per judge


@dataclasses.dataclass
class RequestStats:
    """What a client has done so far (updated on the client's event loop thread)."""

    requests: int = 0
    """HTTP requests made (one per prompt list or conversation; the openai client's retries are
    inside one request)."""

    successes: int = 0
    """Prompts answered."""

    failures: dict[str, int] = dataclasses.field(default_factory=dict)
    """Prompts given up on, by kind: connection, timeout, http_500, http_401, bad_response..."""

    unparsed: int = 0
    """Answers that held no verdict (neither verdict among the top log-probs nor in the text)."""

    @property
    def total_failures(self) -> int:
        return sum(self.failures.values())

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "successes": self.successes,
            "failures": dict(self.failures),
            "unparsed": self.unparsed,
        }


@dataclasses.dataclass(frozen=True)
class Answer:
    """One prompt's answer, whichever endpoint gave it."""

    text: str
    top_logprobs: Optional[dict[str, float]] = None
    """The first generated position's alternatives: token text -> log-probability (several
    entries with one text are added up)."""

    finish_reason: Optional[str] = None


class _Failure(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def api_base(url: str) -> str:
    """``http://host:8000``, ``.../v1`` or ``.../v1/completions`` -> ``http://host:8000/v1``."""
    base = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base if base.endswith("/v1") else base + "/v1"


class OpenAIEndpoint:
    """An OpenAI-compatible server, called through ``openai.AsyncOpenAI`` on a private event
    loop thread so that batched, blocking callers (the trainer) can run many requests at once."""

    def __init__(
        self,
        base_url: str,
        model: Optional[str],
        *,
        api_key_env: Optional[str] = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        concurrency: int = 8,
        prompts_per_request: int = 1,
    ):
        import openai

        if not base_url:
            raise ValueError("OpenAIEndpoint needs the server's base URL")
        if concurrency < 1 or prompts_per_request < 1 or timeout <= 0 or max_retries < 0:
            raise ValueError("concurrency, prompts_per_request and timeout must be positive")
        key = "EMPTY"  # servers without authentication accept any token
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise ValueError(f"environment variable {api_key_env} (the API key) is not set")
        self.base_url = api_base(base_url)
        self.timeout = timeout
        self.max_retries = int(max_retries)
        self.concurrency = concurrency
        self.prompts_per_request = prompts_per_request
        self.deadline = timeout * (self.max_retries + 1) + MAX_RETRY_BACKOFF_S * self.max_retries
        self.stats = RequestStats()
        self._warned: set[str] = set()
        self._openai = openai
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="openai-client", daemon=True
        )
        self._thread.start()
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=key, timeout=timeout, max_retries=self.max_retries
        )
        self._semaphore = self._run(self._make_semaphore())
        self.model = model or self._only_model()

    async def _make_semaphore(self) -> asyncio.Semaphore:
        return asyncio.Semaphore(self.concurrency)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _only_model(self) -> Optional[str]:
        """The served model when none is named: the only one ``GET /v1/models`` lists. None
        when the server does not answer (its requests then fail and are counted as such)."""
        try:
            models = self._run(self._guard(self._client.models.list()))
            names = [model.id for model in models.data]
        except _Failure as failure:
            self._fail(failure, 0)
            return None
        except Exception as error:  # an answer that is not a model list
            self._fail(_Failure("bad_response", f"GET /v1/models: {error}"), 0)
            return None
        if len(names) != 1:
            raise ValueError(
                f"{self.base_url} serves {len(names)} models ({', '.join(names)}): name one"
            )
        return names[0]

    # -- requests -------------------------------------------------------------------------------

    def complete(
        self,
        prompts: Sequence[str],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        logprobs: Optional[int] = None,
        stop: Optional[Sequence[str]] = None,
        rendered_chat: bool = False,
    ) -> list[Optional[Answer]]:
        """``POST /v1/completions``: each prompt's first choice, None where its request failed.
        ``rendered_chat``: the prompts are chat-template renderings (sent without the
        tokenizer's special tokens)."""
        params = {"max_tokens": int(max_tokens), "temperature": float(temperature)}
        if logprobs is not None:
            params["logprobs"] = int(logprobs)
        if stop:
            params["stop"] = list(stop)
        if rendered_chat:
            params["extra_body"] = {"add_special_tokens": False}
        chunks = [
            list(prompts[start : start + self.prompts_per_request])
            for start in range(0, len(prompts), self.prompts_per_request)
        ]
        answers = self._run(self._gather([self._completions(chunk, params) for chunk in chunks]))
        return [answer for chunk in answers for answer in chunk]

    def chat(
        self,
        conversations: Sequence[Conversation],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_logprobs: Optional[int] = None,
        stop: Optional[Sequence[str]] = None,
    ) -> list[Optional[Answer]]:
        """``POST /v1/chat/completions``, one conversation per request; None where it failed."""
        params = {"max_tokens": int(max_tokens), "temperature": float(temperature)}
        if top_logprobs is not None:
            params.update(logprobs=True, top_logprobs=int(top_logprobs))
        if stop:
            params["stop"] = list(stop)
        answers = self._run(self._gather([self._chat(c, params) for c in conversations]))
        return [chunk[0] for chunk in answers]

    async def _gather(self, requests) -> list[list[Optional[Answer]]]:
        return list(await asyncio.gather(*requests))

    async def _guard(self, call):
        """One request under the deadline, its errors as :class:`_Failure`."""
        openai = self._openai
        try:
            return await asyncio.wait_for(call, self.deadline)
        except asyncio.TimeoutError:
            raise _Failure("timeout", f"no complete answer within {self.deadline:.0f} s") from None
        except openai.APITimeoutError:
            raise _Failure("timeout", f"no answer within {self.timeout} s") from None
        except openai.APIConnectionError as error:
            cause = error.__cause__ or error
            raise _Failure("connection", f"{type(cause).__name__}: {cause}") from None
        except openai.APIStatusError as error:
            raise _Failure(f"http_{error.status_code}", error.message) from None
        except Exception as error:  # an unreadable answer (the client's JSON decoding, ...)
            raise _Failure("bad_response", f"{type(error).__name__}: {error}") from None

    async def _completions(self, prompts: list[str], params: dict) -> list[Optional[Answer]]:
        async with self._semaphore:
            self.stats.requests += 1
            try:
                response = await self._guard(
                    self._client.completions.create(model=self.model, prompt=prompts, **params)
                )
                answers = _completion_answers(response, len(prompts))
            except _Failure as failure:
                self._fail(failure, len(prompts))
                return [None] * len(prompts)
        self.stats.successes += len(prompts)
        return answers

    async def _chat(self, conversation: Conversation, params: dict) -> list[Optional[Answer]]:
        messages = conversation.message_dicts()
        extra = {}
        if conversation.prefill:
            messages.append({"role": "assistant", "content": conversation.prefill})
            extra.update(continue_final_message=True, add_generation_prompt=False)
        if conversation.template_kwargs:
            extra["chat_template_kwargs"] = conversation.kwargs()
        async with self._semaphore:
            self.stats.requests += 1
            try:
                response = await self._guard(
                    self._client.chat.completions.create(
                        model=self.model, messages=messages, extra_body=extra or None, **params
                    )
                )
                answer = _chat_answer(response)
            except _Failure as failure:
                self._fail(failure, 1)
                return [None]
        self.stats.successes += 1
        return [answer]

    def _fail(self, failure: _Failure, prompts: int) -> None:
        self.stats.failures[failure.kind] = self.stats.failures.get(failure.kind, 0) + prompts
        if failure.kind in self._warned:
            return
        self._warned.add(failure.kind)
        hint = ""
        if failure.kind in ("http_401", "http_403"):
            hint = " (check the API key: --judge-api-key-env / --rewriter-api-key-env)"
        elif failure.kind == "http_404":
            hint = " (check the URL and the model name)"
        logger.warning(
            "%s: request failed, %s%s; its results are reported missing (further %s failures "
            "are only counted)",
            self.base_url,
            failure.detail,
            hint,
            failure.kind,
        )

    def describe(self) -> str:
        """The client's counters, for error messages."""
        stats = self.stats
        failures = ", ".join(f"{kind} {n}" for kind, n in sorted(stats.failures.items()))
        return (
            f"{self.base_url} (model {self.model}): {stats.requests} requests, "
            f"{stats.successes} prompts answered, failed: {failures or 'none'}, "
            f"unparsed verdicts: {stats.unparsed}"
        )

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


# -- reading answers ---------------------------------------------------------------------------


def _as_dict(response) -> dict:
    if hasattr(response, "model_dump"):
        response = response.model_dump()
    if not isinstance(response, dict):
        raise _Failure("bad_response", f"not a JSON object: {str(response)[:200]!r}")
    return response


def _completion_answers(response, count: int) -> list[Answer]:
    """The answers of a ``/v1/completions`` response to ``count`` prompts, by choice index."""
    body = _as_dict(response)
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) != count:
        got = "none" if choices is None else str(choices)[:200]
        raise _Failure("bad_response", f"expected {count} choices, got {got}")
    answers: list[Optional[Answer]] = [None] * count
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
            raise _Failure("bad_response", f"a choice without text: {str(choice)[:200]!r}")
        index = choice.get("index", position)
        if not isinstance(index, int) or not 0 <= index < count or answers[index] is not None:
            raise _Failure("bad_response", f"choice index {index!r} out of place")
        top = None
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            tops = logprobs.get("top_logprobs")
            if isinstance(tops, list) and tops and isinstance(tops[0], dict):
                top = _merge(tops[0].items())
        answers[index] = Answer(choice["text"], top, choice.get("finish_reason"))
    return answers


def _chat_answer(response) -> Answer:
    """The answer of a ``/v1/chat/completions`` response (its first choice)."""
    body = _as_dict(response)
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Failure("bad_response", f"no choices: {str(body)[:200]!r}")
    choice = choices[0]
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise _Failure("bad_response", f"a choice without message content: {str(choice)[:200]!r}")
    top = None
    logprobs = choice.get("logprobs")
    entries = logprobs.get("content") if isinstance(logprobs, dict) else None
    if isinstance(entries, list) and entries and isinstance(entries[0], dict):
        alternatives = entries[0].get("top_logprobs")
        if isinstance(alternatives, list):
            top = _merge(
                (entry.get("token"), entry.get("logprob"))
                for entry in alternatives
                if isinstance(entry, dict)
            )
    return Answer(content, top, choice.get("finish_reason"))


def _merge(pairs) -> dict[str, float]:
    """token text -> log-probability, entries with one text added up (finite values only)."""
    grouped: dict[str, list[float]] = {}
    for token, value in pairs:
        if isinstance(token, str) and isinstance(value, (int, float)) and math.isfinite(value):
            grouped.setdefault(token, []).append(float(value))
    return {token: _logsumexp(values) for token, values in grouped.items()}


def verdict_from_answer(answer: Optional[Answer], verdicts: Sequence[str]) -> Score:
    """P(positive verdict) from one answer: softmax over the two verdict strings'
    log-probabilities in the first position's alternatives (token texts compared after
    ``strip()``; several tokens spelling one verdict add up), else a strict parse of the text
    (exactly one verdict string present -> 1.0 or 0.0), else None."""
    if answer is None:
        return None
    positive, negative = verdicts
    if answer.top_logprobs:
        found: dict[str, list[float]] = {positive: [], negative: []}
        for text, value in answer.top_logprobs.items():
            if text.strip() in found:
                found[text.strip()].append(value)
        if found[positive] and found[negative]:
            a, b = _logsumexp(found[positive]), _logsumexp(found[negative])
            return 1.0 / (1.0 + math.exp(b - a)) if b - a < 700 else 0.0
    has_positive, has_negative = positive in answer.text, negative in answer.text
    if has_positive != has_negative:
        return 1.0 if has_positive else 0.0
    return None


def _logsumexp(values: Sequence[float]) -> float:
    peak = max(values)
    return peak + math.log(sum(math.exp(v - peak) for v in values))


# -- roles ------------------------------------------------------------------------------------


class _PromptSender:
    """Sends rendered prompts to an endpoint: text to ``/v1/completions`` (a chat prompt rendered
    with ``tokenizer``'s chat template first), conversations to ``/v1/chat/completions``."""

    def __init__(self, endpoint: OpenAIEndpoint, kind: str, prompts: PromptSet, tokenizer, flags):
        endpoint_flag, tokenizer_flag = flags
        if kind not in ENDPOINTS:
            raise ConfigError(endpoint_flag, f"unknown endpoint {kind!r}; one of {ENDPOINTS}")
        if kind == "chat" and not prompts.chat:
            raise ConfigError(
                endpoint_flag,
                f"chat needs a chat prompt pack (llama3, qwen, gpt-oss or a directory of chat "
                f"templates); {prompts.source} is plain text: use completions",
            )
        if kind == "chat" and prompts.chat_endpoint is not True:
            raise ConfigError(endpoint_flag, f"pack {prompts.source}: {prompts.chat_endpoint}")
        if kind == "completions" and prompts.chat and tokenizer is None:
            raise ConfigError(
                tokenizer_flag,
                f"pack {prompts.source} is a chat pack: /v1/completions needs the model's "
                "tokenizer directory to render it with the model's chat template (or use the "
                "chat endpoint)",
            )
        self.endpoint = endpoint
        self.kind = kind
        self.tokenizer = tokenizer

    def send(self, prompts: Sequence, **params) -> list[Optional[Answer]]:
        if self.kind == "chat":
            top = params.pop("logprobs", None)
            return self.endpoint.chat(prompts, top_logprobs=top, **params)
        chat = any(isinstance(p, Conversation) for p in prompts)
        texts = [p.text(self.tokenizer) if isinstance(p, Conversation) else p for p in prompts]
        return self.endpoint.complete(texts, rendered_chat=chat, **params)


class OpenAIJudge(PromptedJudge):
    """The judge on an OpenAI-compatible server, with the colocated judge's prompt packs."""

    def __init__(
        self,
        endpoint: OpenAIEndpoint,
        prompts: PromptSet,
        *,
        endpoint_kind: str = "completions",
        tokenizer=None,
        max_prefix_chars: int = 2000,
        top_logprobs: int = JUDGE_TOP_LOGPROBS,
        safety_window_sentences: int = SAFETY_WINDOW_SENTENCES,
    ):
        super().__init__(prompts, max_prefix_chars, safety_window_sentences)
        self.client = endpoint
        self.sender = _PromptSender(
            endpoint, endpoint_kind, prompts, tokenizer, ("--judge-endpoint", "--judge-tokenizer")
        )
        self.top_logprobs = top_logprobs
        self.identity = f"openai:{endpoint.base_url}:{endpoint.model}:{prompts.fingerprint()}"
        self.unparsed_examples: list[str] = []
        if tokenizer is not None:  # verdicts checked against the model's tokenizer up front
            for name in ("quality", "coherence", "safety", "factuality"):
                if name in prompts.templates:
                    try:
                        verdict_token_ids(prompts[name], tokenizer)
                    except ValueError as error:
                        raise ConfigError("--judge-prompt-dir", str(error)) from None

    def verdicts(self, name: str, prompts: Sequence) -> list[Score]:
        """P(positive verdict) for rendered prompts; None where the server failed or the answer
        held no verdict (counted in ``client.stats.unparsed`` and logged)."""
        template = self.prompts[name]
        if not prompts:
            return []
        answers = self.sender.send(
            prompts, max_tokens=1, temperature=0.0, logprobs=self.top_logprobs
        )
        scores = []
        for answer in answers:
            score = verdict_from_answer(answer, template.verdicts)
            if answer is not None and score is None:
                self._unparsed(template, answer)
            scores.append(score)
        return scores

    def _unparsed(self, template: Template, answer: Answer) -> None:
        self.client.stats.unparsed += 1
        seen = sorted(answer.top_logprobs or {}, key=lambda t: -answer.top_logprobs[t])[:5]
        example = f"text {answer.text!r}, top tokens {seen}"
        if len(self.unparsed_examples) < _LOGGED_EXAMPLES:
            self.unparsed_examples.append(example)
            logger.warning(
                "%s: an answer to %s holds no verdict %s (%s); its score is missing",
                self.client.base_url,
                template.path,
                "/".join(template.verdicts),
                example,
            )

    def describe_failures(self) -> str:
        examples = "; ".join(self.unparsed_examples)
        return self.client.describe() + (f"; unparsed answers: {examples}" if examples else "")

    def close(self) -> None:
        self.client.close()


class OpenAIRewriter(Rewriter):
    """The rewriter on an OpenAI-compatible server: greedy completion of the rewrite prompt,
    cut at the template's stop string."""

    def __init__(
        self,
        endpoint: OpenAIEndpoint,
        prompts: PromptSet,
        *,
        endpoint_kind: str = "completions",
        tokenizer=None,
        max_tokens: int = 128,
        max_prefix_chars: int = 2000,
    ):
        self.client = endpoint
        self.template: Template = prompts["rewrite"]
        self.sender = _PromptSender(
            endpoint,
            endpoint_kind,
            prompts,
            tokenizer,
            ("--rewriter-endpoint", "--rewriter-tokenizer"),
        )
        self.max_tokens = max_tokens
        self.max_prefix_chars = max_prefix_chars
        self.identity = f"openai:{endpoint.base_url}:{endpoint.model}:{prompts.fingerprint()}"

    def rewrite(self, prefixes: Sequence[str], suffixes: Sequence[str]) -> list[Optional[str]]:
        _check_lengths(prefixes, suffixes)
        if not prefixes:
            return []
        prompts = [
            self.template.render(self.max_prefix_chars, prefix=p, suffix=s)
            for p, s in zip(prefixes, suffixes)
        ]
        stop = [self.template.stop] if self.template.stop else None
        answers = self.sender.send(prompts, max_tokens=self.max_tokens, temperature=0.0, stop=stop)
        return [
            None if answer is None else self.template.rewrite_from(answer.text, original)
            for answer, original in zip(answers, suffixes)
        ]

    def describe_failures(self) -> str:
        return self.client.describe()

    def close(self) -> None:
        self.client.close()


# -- builders (roles/config.py's backend table) -----------------------------------------------


def _endpoint(url, model, key_env, timeout, retries, concurrency, per_request, prefix):
    if key_env and not os.environ.get(key_env):
        raise ConfigError(f"--{prefix}-api-key-env", f"environment variable {key_env} is not set")
    try:
        return OpenAIEndpoint(
            url,
            model,
            api_key_env=key_env,
            timeout=timeout,
            max_retries=retries,
            concurrency=concurrency,
            prompts_per_request=per_request,
        )
    except ValueError as error:
        raise ConfigError(f"--{prefix}-url", str(error)) from None


def _tokenizer(path: Optional[str], flag: str):
    if not path:
        return None
    from megatron_sip.data.tokenizers import HuggingFaceTokenizer

    try:
        return HuggingFaceTokenizer(path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(flag, str(error)) from None


def build_openai_judge(config, context) -> OpenAIJudge:
    """``--judge-backend openai`` from a JudgeConfig."""
    require_setting(
        config.judge_url, "--judge-url", "--judge-backend", "openai", "the server's URL"
    )
    prompts = load_pack(config.judge_prompt_dir, "--judge-prompt-dir")
    tokenizer = _tokenizer(config.judge_tokenizer, "--judge-tokenizer")
    endpoint = _endpoint(
        config.judge_url,
        config.judge_model,
        config.judge_api_key_env,
        config.judge_timeout,
        config.judge_max_retries,
        config.judge_concurrency,
        config.judge_prompts_per_request,
        "judge",
    )
    try:
        return OpenAIJudge(
            endpoint,
            prompts,
            endpoint_kind=config.judge_endpoint,
            tokenizer=tokenizer,
            max_prefix_chars=config.judge_max_prefix_chars,
            safety_window_sentences=config.judge_safety_window_sentences,
        )
    except Exception:
        endpoint.close()
        raise


def build_openai_rewriter(config, context) -> OpenAIRewriter:
    """``--rewriter-backend openai`` from a RewriterConfig."""
    require_setting(
        config.rewriter_url, "--rewriter-url", "--rewriter-backend", "openai", "the server's URL"
    )
    prompts = load_pack(config.rewriter_prompt_dir, "--rewriter-prompt-dir")
    tokenizer = _tokenizer(config.rewriter_tokenizer, "--rewriter-tokenizer")
    endpoint = _endpoint(
        config.rewriter_url,
        config.rewriter_model,
        config.rewriter_api_key_env,
        config.rewriter_timeout,
        config.rewriter_max_retries,
        config.rewriter_concurrency,
        config.rewriter_prompts_per_request,
        "rewriter",
    )
    try:
        return OpenAIRewriter(
            endpoint,
            prompts,
            endpoint_kind=config.rewriter_endpoint,
            tokenizer=tokenizer,
            max_tokens=config.rewriter_max_tokens,
            max_prefix_chars=config.rewriter_max_prefix_chars,
        )
    except Exception:
        endpoint.close()
        raise
