"""A fake vLLM OpenAI-compatible server for client tests: real HTTP on 127.0.0.1, schema-exact
answers, and programmable faults.

    with FakeVLLM(model="judge", answer=lambda prompt, body: FakeAnswer("Yes", {"Yes": -0.1})) as s:
        s.url        # "http://127.0.0.1:PORT/v1"
        s.requests   # [RecordedRequest(method, path, headers, body, raw, prompt_text)], thread-safe

Answers follow vLLM's pydantic models field for field (every field present, ``None`` included,
as vLLM returns ``JSONResponse(content=response.model_dump())``). Read from vllm-project/vllm:

* ``vllm/entrypoints/openai/completion/protocol.py`` @ 002032ee2b18 (CompletionRequest,
  CompletionLogProbs, CompletionResponse[Choice]);
* ``vllm/entrypoints/openai/chat_completion/protocol.py`` @ 002032ee2b18 (ChatCompletionRequest,
  ChatCompletionLogProb[sContent], ChatCompletionResponse[Choice], ChatMessage);
* ``vllm/entrypoints/openai/serving_completion.py`` @ 00463e627b4c (``_create_completion_logprobs``:
  top-logprobs dict = sampled token first, then the top-k, at most k+1 entries; ``-9999.0`` for
  -inf; ``text_offset``; choice ``index`` = prompt position * n + sample);
* ``vllm/entrypoints/openai/chat_completion/serving.py`` @ 006c49d485f9 (``_create_chat_logprobs``:
  ``top_logprobs`` = the first k entries of that same dict, ``bytes`` = UTF-8 of the token);
* ``vllm/frontend/entrypoints/serve/exception_handling/{error_response,handlers/*}.py`` and
  ``.../serve/engine/serving.py`` @ 055e47c28003 (errors ``{"error": {message, type, param,
  code}}``; 404 ``The model `x` does not exist.`` with param "model"; request-validation errors
  typed "Bad Request"), ``vllm/entrypoints/openai/server_utils.py`` @ 029329a8eded
  (``AuthenticationMiddleware``: 401 ``{"error": "Unauthorized"}`` on /v1 paths) and
  ``vllm/renderers/params.py`` @ 017638d70159 (too-long prompt message, param "input_tokens").
  vLLM <= 0.10.0 answered errors flat: ``{"object": "error", message, type, param, code}``
  (changed by vllm PR #22099, in 0.10.1); ``error_format="flat"`` gives that.

vLLM itself never answers 429 and has no Retry-After; those faults model a proxy in front of it,
with vLLM-shaped bodies. Not emulated: streaming, ``echo``, tools, ``prompt_logprobs``. The fake
tokenizer counts whitespace-separated words (token-id prompts count their ids).

Faults (``Fault.*``) are chosen per request by ``faults``: one Fault for every request, a list
(``faults[i]`` for the i-th request received, 0-based; ``None`` or past the end = normal), a dict
{index: Fault}, or a callable ``(index, RecordedRequest) -> Fault | None``. It may be reassigned
while the server runs.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

LOGPROB_FLOOR = -9999.0  # vLLM: max(logprob, -9999.0), "the JSON-serializable float OpenAI uses"


@dataclasses.dataclass
class FakeAnswer:
    """What the fake model generates for one prompt (or one conversation)."""

    text: str
    top_logprobs: dict[str, float] | None = None
    """Log-probabilities at the FIRST generated position (token -> logprob), e.g. the judge's
    verdict distribution. The first token's own logprob is taken from here, else the leftover
    mass log(1 - sum p). Later positions are certain (logprob 0.0, no alternatives)."""
    tokens: list[str] | None = None
    """How ``text`` splits into tokens; default one token (the whole text)."""
    finish_reason: str | None = None
    """Default: "length" if the tokens reach ``max_tokens`` (no room for EOS), else "stop"."""


@dataclasses.dataclass(frozen=True)
class Fault:
    """A misbehaviour for one request; build with the static methods below."""

    kind: str
    status: int = 200
    message: str = ""
    type: str | None = None
    param: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    content_type: str = "application/json"
    interval: float = 1.0
    partial: bool = True

    @staticmethod
    def error(
        status: int,
        message: str = "",
        type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Fault:
        """HTTP ``status`` with a vLLM error body (type defaults as vLLM's would)."""
        return Fault(
            "error",
            status,
            message or HTTPStatus(status).phrase,
            type,
            param,
            tuple((headers or {}).items()),
        )

    @staticmethod
    def rate_limited(
        retry_after: float | str | None = 1, message: str = "Too Many Requests"
    ) -> Fault:
        """429 with ``Retry-After`` (seconds, or an HTTP date string; None: no header)."""
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return Fault.error(429, message, headers=headers)

    @staticmethod
    def unavailable(message: str = "Service Unavailable") -> Fault:
        return Fault.error(503, message)

    @staticmethod
    def internal_error(message: str = "Internal server error") -> Fault:
        return Fault.error(500, message)

    @staticmethod
    def garbage(
        body: bytes = b"<html><body>502 Bad Gateway</body></html>",
        content_type: str = "application/json",
    ) -> Fault:
        """Status 200 with a body that is not JSON (content type still claims JSON)."""
        return Fault("garbage", body=body, content_type=content_type)

    @staticmethod
    def missing_choices() -> Fault:
        """Status 200, the normal JSON answer without its ``choices`` key."""
        return Fault("missing_choices")

    @staticmethod
    def drip(interval: float = 1.0) -> Fault:
        """Headers at once, then the normal body one byte every ``interval`` seconds: a client
        whose timeout is per read never times out."""
        return Fault("drip", interval=interval)

    @staticmethod
    def hang() -> Fault:
        """Read the request, never answer (until the server closes)."""
        return Fault("hang")

    @staticmethod
    def disconnect(partial: bool = True) -> Fault:
        """Close the connection mid-answer: after the headers and half the body (``partial``),
        or before sending anything."""
        return Fault("disconnect", partial=partial)


@dataclasses.dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # the parsed JSON, None if absent or invalid
    raw: bytes
    prompt_text: str | None = None  # chat only: the conversation as the fake template rendered it


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeVLLM


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "uvicorn"  # vLLM runs under uvicorn
    sys_version = ""
    server: _Server

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        self.server.fake._handle(self)

    do_POST = do_GET


class FakeVLLM:
    """A fake vLLM server in a background thread; use as a context manager (see module doc)."""

    def __init__(
        self,
        model: str = "judge",
        answer: Callable[[Any, dict], Any] | None = None,
        faults: Any = None,
        api_key: str | None = None,
        max_model_len: int = 4096,
        error_format: str = "nested",
    ):
        self.model = model
        self.answer = answer or (lambda prompt, body: FakeAnswer("ok"))
        self.faults = faults
        self.api_key = api_key
        self.max_model_len = max_model_len
        assert error_format in ("nested", "flat")
        self.error_format = error_format
        self._requests: list[RecordedRequest] = []
        self._cond = threading.Condition()
        self._released = threading.Event()  # wakes hanging and dripping handlers on close
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> FakeVLLM:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._released.set()
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        assert self._httpd is not None, "use FakeVLLM as a context manager"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._cond:
            return list(self._requests)

    def bodies(self, path: str | None = None) -> list[Any]:
        """The JSON bodies received, optionally only those to ``path`` (e.g. "/v1/completions")."""
        return [r.body for r in self.requests if path is None or r.path == path]

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(f"{len(self._requests)} of {count} requests arrived")
            return list(self._requests)

    # -- one request -----------------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        handler.close_connection = True  # one request per connection: simple, and what we test
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body, bad_json = (json.loads(raw) if raw else None), False
        except ValueError:
            body, bad_json = None, True
        record = RecordedRequest(
            handler.command,
            urlsplit(handler.path).path,
            {k.lower(): v for k, v in handler.headers.items()},
            body,
            raw,
        )
        with self._cond:
            index = len(self._requests)
            self._requests.append(record)
            self._cond.notify_all()

        fault = self._fault_for(index, record)
        if fault is not None and fault.kind == "hang":
            self._released.wait()
            return
        if fault is not None and fault.kind == "error":
            payload = self._error(fault.status, fault.message, fault.type, fault.param)
            self._send(handler, fault.status, payload, headers=fault.headers)
            return
        if fault is not None and fault.kind == "garbage":
            self._send(handler, 200, fault.body, content_type=fault.content_type)
            return

        status, payload = self._respond(record, bad_json)
        if fault is not None and fault.kind == "missing_choices" and status == 200:
            payload = {k: v for k, v in payload.items() if k != "choices"}
        self._send(handler, status, payload, fault=fault)

    def _fault_for(self, index: int, record: RecordedRequest) -> Fault | None:
        faults = self.faults
        if faults is None or isinstance(faults, Fault):
            return faults
        if isinstance(faults, dict):
            return faults.get(index)
        if isinstance(faults, (list, tuple)):
            return faults[index] if index < len(faults) else None
        return faults(index, record)

    def _send(
        self,
        handler: _Handler,
        status: int,
        payload: Any,
        *,
        content_type: str = "application/json",
        headers: tuple = (),
        fault: Fault | None = None,
    ) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            if fault is not None and fault.kind == "disconnect" and not fault.partial:
                handler.connection.shutdown(socket.SHUT_RDWR)  # not a byte sent
                return
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            for name, value in headers:
                handler.send_header(name, value)
            handler.send_header("Connection", "close")
            handler.end_headers()
            if fault is not None and fault.kind == "drip":
                for i in range(len(data)):
                    if self._released.wait(fault.interval):
                        return
                    handler.wfile.write(data[i : i + 1])
            elif fault is not None and fault.kind == "disconnect":
                handler.wfile.write(data[: len(data) // 2])
                handler.connection.shutdown(socket.SHUT_RDWR)
            else:
                handler.wfile.write(data)
        except OSError:
            pass  # the client went away (timeout tests)

    # -- vLLM's behaviour ------------------------------------------------------------------------

    def _error(
        self, status: int, message: str, type: str | None = None, param: str | None = None
    ) -> dict:
        """vLLM's ErrorResponse; the default type is what vLLM's handlers use for ``status``."""
        if type is None:
            type = {
                400: "BadRequestError",
                404: "NotFoundError",
                422: "UnprocessableEntityError",
                500: "InternalServerError",
                501: "NotImplementedError",
            }.get(status, HTTPStatus(status).phrase)
        info = {"message": message, "type": type, "param": param, "code": status}
        return {"error": info} if self.error_format == "nested" else {"object": "error", **info}

    def _respond(self, record: RecordedRequest, bad_json: bool) -> tuple[int, Any]:
        """(status, JSON payload) as vLLM would answer, before any fault."""
        if self.api_key is not None and record.path.startswith("/v1"):
            scheme, _, token = record.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token != self.api_key:
                return 401, {"error": "Unauthorized"}  # vLLM's exact body, not an ErrorResponse
        if record.method == "GET" and record.path == "/v1/models":
            return 200, self._models()
        if record.method == "GET" and record.path == "/health":
            return 200, b""
        if record.method != "POST" or record.path not in (
            "/v1/completions",
            "/v1/chat/completions",
        ):
            return 404, {"detail": "Not Found"}  # FastAPI's unknown-route answer
        body = record.body
        if bad_json or not isinstance(body, dict):
            return 400, self._error(400, "1 validation error:\n  JSON decode error", "Bad Request")
        if body.get("model") and body["model"] != self.model:
            return 404, self._error(
                404, f"The model `{body['model']}` does not exist.", param="model"
            )
        if body.get("stream"):
            return 400, self._error(400, "FakeVLLM does not implement stream=True")
        try:
            if record.path == "/v1/completions":
                return self._completions(body)
            return self._chat(body, record)
        except _VLLMError as e:
            return e.status, self._error(e.status, e.message, e.type, e.param)
        except Exception as e:  # an answer() that raises: vLLM's 500
            return 500, self._error(500, str(e))

    def _check_length(self, prompt_tokens: int, max_output: int, param: str) -> None:
        """vLLM's TokenizeParams checks (vllm/renderers/params.py)."""
        total = self.max_model_len
        if max_output > total:
            raise _VLLMError(
                f"{param}={max_output}cannot be greater than "
                f"max_model_len=max_total_tokens={total}. "
                f"Please request fewer output tokens.",
                param=param,
            )
        if prompt_tokens > total - max_output:
            raise _VLLMError(
                f"You passed {prompt_tokens} input tokens and requested {max_output} output "
                f"tokens. However, the model's context length is only {total} tokens, resulting "
                f"in a maximum input length of {total - max_output} tokens. Please reduce the "
                f"length of the input prompt.",
                param="input_tokens",
            )

    def _generate(self, prompt: Any, body: dict, max_tokens: int | None):
        """(tokens, logprob steps, finish_reason) for one prompt; see FakeAnswer."""
        answer = self.answer(prompt, body)
        if isinstance(answer, str):
            answer = FakeAnswer(answer)
        tokens = (
            list(answer.tokens)
            if answer.tokens is not None
            else ([answer.text] if answer.text else [])
        )
        assert "".join(tokens) == answer.text, "FakeAnswer.tokens must join to its text"
        # vLLM counts the EOS the model samples after the text: with no room left for it, the
        # generation ends by length, e.g. max_tokens=1 and a one-token verdict -> "length"
        cut = max_tokens is not None and len(tokens) >= max_tokens
        tokens = tokens[:max_tokens] if cut else tokens
        steps = []  # per position: [(token, logprob)], the sampled token first, then the ranked
        for i, token in enumerate(tokens):
            dist = (answer.top_logprobs or {}) if i == 0 else {}
            if token in dist:
                sampled = dist[token]
            elif dist:
                leftover = 1.0 - sum(math.exp(v) for v in dist.values())
                sampled = math.log(leftover) if leftover > 0 else -math.inf
            else:
                sampled = 0.0
            ranked = sorted(dist.items(), key=lambda kv: -kv[1])
            steps.append([(token, sampled)] + [kv for kv in ranked if kv[0] != token])
        finish = answer.finish_reason or ("length" if cut else "stop")
        return tokens, steps, finish

    def _completions(self, body: dict) -> tuple[int, dict]:
        prompt = body.get("prompt")
        if prompt in (None, "", []):
            raise _VLLMError(
                "1 validation error:\n  Value error, Either prompt or prompt_embeds "
                "must be provided and non-empty.",
                "Bad Request",
                "prompt",
            )
        # str | list[str] | list[int] | list[list[int]]: a list of ints is ONE prompt
        if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        max_tokens = body.get("max_tokens")
        max_tokens = 16 if max_tokens is None else max_tokens  # CompletionRequest default
        n = body.get("n") or 1
        k = body.get("logprobs")  # int | None; 0 still returns the sampled token
        bos = 1 if body.get("add_special_tokens", True) else 0
        counts = [len(p) if isinstance(p, list) else len(p.split()) + bos for p in prompts]
        for count in counts:  # vLLM renders (and checks) every prompt before generating
            self._check_length(count, max_tokens, "max_tokens")
        choices, completion_tokens = [], 0
        for prompt in prompts:
            tokens, steps, finish = self._generate(prompt, body, max_tokens)
            for _ in range(n):  # index = prompt position * n + sample
                logprobs = None
                if k is not None:
                    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
                    keep = None if k == -1 else k + 1  # sampled + top-k
                    logprobs = {
                        "text_offset": offsets,
                        "token_logprobs": [_floor(step[0][1]) for step in steps],
                        "tokens": list(tokens),
                        "top_logprobs": [{t: _floor(v) for t, v in step[:keep]} for step in steps],
                    }
                choices.append(
                    {
                        "index": len(choices),
                        "text": "".join(tokens),
                        "logprobs": logprobs,
                        "finish_reason": finish,
                        "stop_reason": None,
                        "token_ids": None,
                        "prompt_logprobs": None,
                        "prompt_token_ids": None,
                        "routed_experts": None,
                    }
                )
                completion_tokens += len(tokens)
        return 200, {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": _usage(sum(counts), completion_tokens),
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }

    def _chat(self, body: dict, record: RecordedRequest) -> tuple[int, dict]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _VLLMError(
                "1 validation error:\n  Field required: messages", "Bad Request", "messages"
            )
        continue_final = bool(body.get("continue_final_message"))
        if continue_final and body.get("add_generation_prompt"):  # the request validator
            raise _VLLMError(
                "1 validation error:\n  Value error, Cannot set both "
                "`continue_final_message` and `add_generation_prompt` to True.",
                "Bad Request",
            )
        top = body.get("top_logprobs") or 0
        if top and not body.get("logprobs"):
            raise _VLLMError(
                "1 validation error:\n  Value error, when using `top_logprobs`, "
                "`logprobs` must be set to true.",
                "Bad Request",
                "top_logprobs",
            )
        add_generation_prompt = body.get("add_generation_prompt", True)  # vLLM's default
        if continue_final and add_generation_prompt:  # transformers' apply_chat_template
            raise _VLLMError(
                "continue_final_message and add_generation_prompt are not "
                "compatible. Use continue_final_message when you want the model to "
                "continue the final message, and add_generation_prompt when you "
                "want to add a header that will prompt it to start a new assistant "
                "message instead."
            )
        record.prompt_text = render_chat(
            messages, add_generation_prompt, continue_final, body.get("chat_template_kwargs") or {}
        )
        prompt_tokens = len(record.prompt_text.split()) + (
            1 if body.get("add_special_tokens", False) else 0
        )
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        self._check_length(
            prompt_tokens,
            max_tokens or 0,
            "max_completion_tokens"
            if body.get("max_completion_tokens") is not None
            else "max_tokens",
        )
        tokens, steps, finish = self._generate(messages, body, max_tokens)
        logprobs = None
        if body.get("logprobs"):
            keep = None if top == -1 else top

            def entry(token, value):
                return {
                    "token": token,
                    "logprob": _floor(value),
                    "bytes": list(token.encode("utf-8", errors="replace")),
                }

            logprobs = {
                "content": [
                    {**entry(*step[0]), "top_logprobs": [entry(*kv) for kv in step[:keep]]}
                    for step in steps
                ]
            }
        n = body.get("n") or 1
        choices = [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": "".join(tokens),
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": logprobs,
                "finish_reason": finish,
                "stop_reason": None,
                "token_ids": None,
                "routed_experts": None,
            }
            for i in range(n)
        ]
        return 200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": _usage(prompt_tokens, n * len(tokens)),
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }

    def _models(self) -> dict:
        now = int(time.time())
        permission = {
            "id": f"modelperm-{uuid.uuid4().hex}",
            "object": "model_permission",
            "created": now,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model,
                    "object": "model",
                    "created": now,
                    "owned_by": "vllm",
                    "root": self.model,
                    "parent": None,
                    "max_model_len": self.max_model_len,
                    "permission": [permission],
                }
            ],
        }


class _VLLMError(Exception):
    def __init__(
        self, message: str, type: str | None = None, param: str | None = None, status: int = 400
    ):
        super().__init__(message)
        self.message, self.type, self.param, self.status = message, type, param, status


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def render_chat(
    messages: list,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict | None = None,
) -> str:
    """A ChatML-like stand-in for the model's chat template, so tests can see the flags' effect:
    ``continue_final_message`` leaves the last message open (no end marker),
    ``add_generation_prompt`` opens an assistant turn, and ``chat_template_kwargs``
    ``{"enable_thinking": False}`` appends an empty think block (as Qwen3's template does)."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") or ""
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        last_open = continue_final_message and i == len(messages) - 1
        out.append(
            f"<|im_start|>{message.get('role')}\n{content}" + ("" if last_open else "<|im_end|>\n")
        )
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
        if (template_kwargs or {}).get("enable_thinking") is False:
            out.append("<think>\n\n</think>\n\n")
    return "".join(out)
