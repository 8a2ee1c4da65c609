"""Judge and rewriter served by an OpenAI-compatible ``/v1/completions`` server.

Any server that speaks the legacy completions API works: ``tools/serve_judge.py`` (a Megatron
checkpoint), vLLM, SGLang. Prompts are rendered with the same templates as the colocated backend
(``--judge-prompt-dir``), sent one per request, ``concurrency`` requests at a time, with the
standard library only (``urllib``).

The judge asks for one greedy token with the top-20 log-probabilities and reads its verdict as the
colocated judge does: P(positive) = softmax over the two verdict strings' log-probabilities at the
answer position. A server that returns no log-probabilities, or whose top-20 misses a verdict,
falls back to a strict parse of the generated text (exactly one verdict string -> 1 or 0).

Failures never raise: connection errors, timeouts, HTTP 5xx and 429 are retried with exponential
backoff; whatever still fails (and every other 4xx, or an unreadable answer) is ``None`` for that
prompt, a missing score. ``client.stats`` counts requests, retries and failures by kind; each
failure kind is logged once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import logging
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Optional

from megatron_sip.errors import ConfigError
from megatron_sip.roles.base import Rewriter, Score, _check_lengths
from megatron_sip.roles.config import require_setting
from megatron_sip.roles.prompts import (
    SAFETY_WINDOW_SENTENCES,
    PromptedJudge,
    PromptSet,
    Template,
)

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
JUDGE_TOP_LOGPROBS = 20


@dataclasses.dataclass
class RequestStats:
    """What a client has done so far (thread-safe counters)."""

    requests: int = 0
    """HTTP requests sent, retries included."""

    retries: int = 0
    """Requests that were sent again after a retryable failure."""

    successes: int = 0
    """Prompts answered."""

    failures: dict[str, int] = dataclasses.field(default_factory=dict)
    """Prompts given up on, by kind: connection, timeout, http_500, http_401, bad_response..."""

    @property
    def total_failures(self) -> int:
        return sum(self.failures.values())

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "successes": self.successes,
            "failures": dict(self.failures),
        }


class _Failure(Exception):
    def __init__(self, kind: str, detail: str, retryable: bool, retry_after: float = 0.0):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after


def completions_url(base_url: str) -> str:
    """``http://host:8000`` or ``http://host:8000/v1`` -> ``http://host:8000/v1/completions``."""
    base = base_url.rstrip("/")
    if base.endswith("/completions"):
        return base
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/completions"


class OpenAICompletionsClient:
    """Sends prompts to ``POST {base_url}/v1/completions``, one request per prompt."""

    def __init__(
        self,
        base_url: str,
        model: Optional[str],
        api_key_env: Optional[str] = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        concurrency: int = 8,
        backoff: float = 0.5,
    ):
        if not base_url:
            raise ValueError("OpenAICompletionsClient needs the server's base URL")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url
        self.url = completions_url(base_url)
        self.model = model
        self.timeout = timeout
        self.max_retries = max(0, int(max_retries))
        self.backoff = backoff
        self.api_key_env = api_key_env
        self._api_key = None
        if api_key_env:
            self._api_key = os.environ.get(api_key_env)
            if not self._api_key:
                raise ValueError(f"environment variable {api_key_env} (the API key) is not set")
        self.stats = RequestStats()
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="openai-client"
        )

    # -- requests -----------------------------------------------------------------------------

    def complete(
        self,
        prompts: Sequence[str],
        max_tokens: int,
        temperature: float = 0.0,
        logprobs: Optional[int] = None,
        stop: Optional[Sequence[str]] = None,
    ) -> list[Optional[dict]]:
        """The first choice of each prompt's completion (``text``, ``logprobs``,
        ``finish_reason``...), None where the request failed."""
        payload = {"max_tokens": int(max_tokens), "temperature": float(temperature)}
        if self.model:
            payload["model"] = self.model
        if logprobs is not None:
            payload["logprobs"] = int(logprobs)
        if stop:
            payload["stop"] = list(stop)
        futures = [self._pool.submit(self._one, {**payload, "prompt": p}) for p in prompts]
        return [future.result() for future in futures]

    def _one(self, payload: dict) -> Optional[dict]:
        body = json.dumps(payload).encode()
        attempt = 0
        while True:
            self._count("requests")
            try:
                choice = self._post(body)
            except _Failure as failure:
                if failure.retryable and attempt < self.max_retries:
                    delay = min(MAX_BACKOFF_S, self.backoff * 2**attempt)
                    delay = max(delay * (0.5 + random.random()), failure.retry_after)
                    attempt += 1
                    self._count("retries")
                    time.sleep(min(delay, MAX_BACKOFF_S))
                    continue
                self._fail(failure)
                return None
            except Exception as error:  # never let one request stop the caller
                self._fail(_Failure("error", f"{type(error).__name__}: {error}", False))
                return None
            self._count("successes")
            return choice

    def _post(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except Exception as error:
            raise self._classify(error) from None
        try:
            answer = json.loads(raw)
            choice = answer["choices"][0]
            if not isinstance(choice, dict) or not isinstance(choice.get("text", ""), str):
                raise TypeError("choice is not an object with a text")
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise _Failure(
                "bad_response", f"unreadable answer ({error}): {raw[:200]!r}", False
            ) from None
        return choice

    def _classify(self, error: Exception) -> _Failure:
        if isinstance(error, urllib.error.HTTPError):
            status = error.code
            retry_after = 0.0
            if status == 429:
                try:
                    retry_after = min(float(error.headers.get("Retry-After", 0)), MAX_BACKOFF_S)
                except (TypeError, ValueError):
                    retry_after = 0.0
            retryable = status == 429 or status >= 500
            detail = f"HTTP {status}: {_error_detail(error)}"
            return _Failure(f"http_{status}", detail, retryable, retry_after)
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        if isinstance(reason, TimeoutError):
            return _Failure("timeout", f"no answer within {self.timeout}s", True)
        if isinstance(reason, (OSError, http.client.HTTPException)):
            # Refused, reset, or dropped mid-answer (a killed server: RemoteDisconnected,
            # IncompleteRead).
            return _Failure("connection", f"{type(reason).__name__}: {reason}", True)
        return _Failure("error", f"{type(error).__name__}: {error}", False)

    def _count(self, field: str) -> None:
        with self._lock:
            setattr(self.stats, field, getattr(self.stats, field) + 1)

    def _fail(self, failure: _Failure) -> None:
        with self._lock:
            self.stats.failures[failure.kind] = self.stats.failures.get(failure.kind, 0) + 1
            first = failure.kind not in self._warned
            self._warned.add(failure.kind)
        if first:
            hint = ""
            if failure.kind in ("http_401", "http_403"):
                hint = " (check the API key: --judge-api-key-env / --rewriter-api-key-env)"
            elif failure.kind == "http_404":
                hint = " (check the URL and the model name)"
            logger.warning(
                "%s: request failed, %s%s; its result is reported missing (further %s failures "
                "are only counted in the client's stats)",
                self.url,
                failure.detail,
                hint,
                failure.kind,
            )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> OpenAICompletionsClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _error_detail(error: urllib.error.HTTPError) -> str:
    try:
        raw = error.read()[:500]
    except Exception:
        return error.reason or ""
    try:
        message = json.loads(raw)["error"]["message"]
        return str(message)
    except Exception:
        return raw.decode(errors="replace").strip() or str(error.reason)


# -- reading verdicts -------------------------------------------------------------------------


def verdict_from_choice(choice: Optional[dict], verdicts: Sequence[str]) -> Score:
    """P(positive verdict) from one completion choice: softmax over the two verdict strings'
    log-probabilities in the first position's ``top_logprobs`` (token texts compared after
    ``strip()``; several tokens spelling one verdict add up), else a strict parse of the text
    (exactly one verdict string present -> 1.0 or 0.0), else None."""
    if choice is None:
        return None
    positive, negative = verdicts
    top = _first_top_logprobs(choice)
    if top:
        found: dict[str, list[float]] = {positive: [], negative: []}
        for text, value in top.items():
            key = str(text).strip()
            if key in found and isinstance(value, (int, float)) and math.isfinite(value):
                found[key].append(float(value))
        if found[positive] and found[negative]:
            a, b = _logsumexp(found[positive]), _logsumexp(found[negative])
            return 1.0 / (1.0 + math.exp(b - a)) if b - a < 700 else 0.0
    text = choice.get("text")
    if not isinstance(text, str):
        return None
    has_positive, has_negative = positive in text, negative in text
    if has_positive != has_negative:
        return 1.0 if has_positive else 0.0
    return None


def _first_top_logprobs(choice: dict) -> Optional[dict]:
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return None
    top = logprobs.get("top_logprobs")
    if not isinstance(top, list) or not top or not isinstance(top[0], dict):
        return None
    return top[0]


def _logsumexp(values: Sequence[float]) -> float:
    peak = max(values)
    return peak + math.log(sum(math.exp(v - peak) for v in values))


# -- roles ------------------------------------------------------------------------------------


class OpenAIJudge(PromptedJudge):
    """The judge on an OpenAI-compatible server, with the colocated judge's prompts."""

    def __init__(
        self,
        client: OpenAICompletionsClient,
        prompts: PromptSet,
        *,
        max_prefix_chars: int = 2000,
        top_logprobs: int = JUDGE_TOP_LOGPROBS,
        safety_window_sentences: int = SAFETY_WINDOW_SENTENCES,
    ):
        super().__init__(prompts, max_prefix_chars, safety_window_sentences)
        self.client = client
        self.top_logprobs = top_logprobs
        self.identity = f"openai:{client.base_url}:{client.model}:{prompts.fingerprint()}"

    def verdicts(self, name: str, prompts: Sequence[str]) -> list[Score]:
        """P(positive verdict) for rendered prompts; None where the server failed."""
        template = self.prompts[name]
        if not prompts:
            return []
        choices = self.client.complete(
            prompts, max_tokens=1, temperature=0.0, logprobs=self.top_logprobs
        )
        return [verdict_from_choice(choice, template.verdicts) for choice in choices]

    def close(self) -> None:
        self.client.close()


class OpenAIRewriter(Rewriter):
    """The rewriter on an OpenAI-compatible server: greedy completion of the rewrite prompt,
    cut at the template's stop string."""

    def __init__(
        self,
        client: OpenAICompletionsClient,
        prompts: PromptSet,
        *,
        max_tokens: int = 128,
        max_prefix_chars: int = 2000,
    ):
        self.client = client
        self.template: Template = prompts["rewrite"]
        self.max_tokens = max_tokens
        self.max_prefix_chars = max_prefix_chars
        self.identity = f"openai:{client.base_url}:{client.model}:{prompts.fingerprint()}"

    def rewrite(self, prefixes: Sequence[str], suffixes: Sequence[str]) -> list[Optional[str]]:
        _check_lengths(prefixes, suffixes)
        if not prefixes:
            return []
        prompts = [
            self.template.render(self.max_prefix_chars, prefix=p, suffix=s)
            for p, s in zip(prefixes, suffixes)
        ]
        stop = [self.template.stop] if self.template.stop else None
        choices = self.client.complete(
            prompts, max_tokens=self.max_tokens, temperature=0.0, stop=stop
        )
        texts: list[Optional[str]] = []
        for choice in choices:
            text = None if choice is None else choice.get("text")
            if not isinstance(text, str):
                texts.append(None)
                continue
            if self.template.stop and self.template.stop in text:
                text = text.split(self.template.stop)[0]
            texts.append(text.strip())
        return texts

    def close(self) -> None:
        self.client.close()


# -- builders (roles/config.py's backend table) -----------------------------------------------


def _require_env(flag: str, variable: Optional[str]) -> None:
    if variable and not os.environ.get(variable):
        raise ConfigError(flag, f"environment variable {variable} (the API key) is not set")


def build_openai_judge(config, context) -> OpenAIJudge:
    """``--judge-backend openai`` from a JudgeConfig."""
    require_setting(
        config.judge_url, "--judge-url", "--judge-backend", "openai", "the server's URL"
    )
    _require_env("--judge-api-key-env", config.judge_api_key_env)
    client = OpenAICompletionsClient(
        config.judge_url,
        config.judge_model,
        api_key_env=config.judge_api_key_env,
        timeout=config.judge_timeout,
        max_retries=config.judge_max_retries,
        concurrency=config.judge_concurrency,
    )
    return OpenAIJudge(
        client,
        PromptSet.load(config.judge_prompt_dir),
        max_prefix_chars=config.judge_max_prefix_chars,
        safety_window_sentences=config.judge_safety_window_sentences,
    )


def build_openai_rewriter(config, context) -> OpenAIRewriter:
    """``--rewriter-backend openai`` from a RewriterConfig."""
    require_setting(
        config.rewriter_url, "--rewriter-url", "--rewriter-backend", "openai", "the server's URL"
    )
    _require_env("--rewriter-api-key-env", config.rewriter_api_key_env)
    client = OpenAICompletionsClient(
        config.rewriter_url,
        config.rewriter_model,
        api_key_env=config.rewriter_api_key_env,
        timeout=config.rewriter_timeout,
        max_retries=config.rewriter_max_retries,
    )
    return OpenAIRewriter(
        client,
        PromptSet.load(config.rewriter_prompt_dir),
        max_tokens=config.rewriter_max_tokens,
    )
