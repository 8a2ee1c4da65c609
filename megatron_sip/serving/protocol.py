"""What a client may send, checked strictly, and the error bodies it gets back.

Bodies are parsed before any schema sees them, because Python's ``json`` is lenient where a
server must not be: it reads ``NaN``, ``Infinity`` and ``1e400`` (inf) as floats, integers of any
size, and recurses once per nesting level (a deeply nested body raises RecursionError, a 500).
Here those are 400s naming what is wrong. The schemas (pydantic, strict) then refuse wrong types
(``"echo": "no"``), unknown fields (by name) and OpenAI fields this server does not implement
unless they hold their harmless defaults (``n: 1``, ``stream: false``, ...).

Errors have OpenAI's and vLLM's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any, ClassVar, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_TOP_LOGPROBS = 20
"""OpenAI's cap on alternatives per position (completions ``logprobs``, chat ``top_logprobs``)."""
MAX_JSON_DEPTH = 64
MAX_STOP_STRINGS = 16
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# The OpenAI client's exception names, so a client sees the kind it would from OpenAI or vLLM.
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class RequestError(Exception):
    """A request the server does not answer: ``status`` and a message naming the cause
    (``param``: the field at fault, when there is one)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: Optional[str] = None) -> dict:
    kind = ERROR_TYPES.get(status)
    if kind is None:
        kind = "InternalServerError" if status >= 500 else HTTPStatus(status).phrase
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


# -- JSON ----------------------------------------------------------------------------------------

# A JSON string (skipped whole, so brackets inside strings do not count) or a bracket.
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def check_depth(text: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuses JSON nested deeper than ``limit`` before ``json`` recurses into it."""
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                raise RequestError(400, f"the JSON body is nested deeper than {limit} levels")
        elif token in "]}":
            depth -= 1


def _constant(name: str):
    raise RequestError(400, f"the JSON body holds {name}: not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise RequestError(400, f"the JSON body holds {text[:40]}, too large for a float")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 19 or not INT64_MIN <= int(text) <= INT64_MAX:
        raise RequestError(
            400, f"the JSON body holds the integer {text[:40]}, outside the 64-bit range"
        )
    return int(text)


def parse_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A request body as JSON, strictly: UTF-8, finite 64-bit numbers, at most ``max_depth``
    levels of nesting."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "the request body is not UTF-8 text") from None
    if not text.strip():
        raise RequestError(400, "the request body is empty; send a JSON object")
    check_depth(text, max_depth)
    try:
        return json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except (ValueError, RecursionError) as error:
        message = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        raise RequestError(400, f"the request body is not valid JSON: {message}") from None


# -- schemas ---------------------------------------------------------------------------------

Stop = Union[str, list[str], None]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _SamplingRequest(_Strict):
    """Fields the completions and chat endpoints share."""

    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Stop = None
    # OpenAI's fields that change nothing at their defaults; other values are refused.
    user: Optional[str] = None
    n: Optional[int] = None
    stream: Optional[bool] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None

    UNSUPPORTED: ClassVar[dict] = {
        "n": (1, "only n = 1 is supported"),
        "stream": (False, "streaming is not supported"),
        "presence_penalty": (0, "presence_penalty is not supported (only 0)"),
        "frequency_penalty": (0, "frequency_penalty is not supported (only 0)"),
        "logit_bias": ({}, "logit_bias is not supported"),
    }

    def check_supported(self) -> None:
        for name, (default, message) in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if value is not None and value != default:
                raise RequestError(400, f"'{name}': {message}, got {_short(value)}", name)

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > MAX_STOP_STRINGS:
            raise RequestError(
                400, f"'stop': at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop"
            )
        return tuple(stop for stop in stops if stop)


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``: OpenAI's legacy schema, with vLLM's ``add_special_tokens``."""

    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(None, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Optional[bool] = None
    add_special_tokens: bool = True
    """False: the prompt is tokenized without the tokenizer's own special tokens (BOS), as text
    rendered by a chat template already holds them."""
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    UNSUPPORTED: ClassVar[dict] = {
        **_SamplingRequest.UNSUPPORTED,
        "best_of": (1, "only best_of = 1 is supported"),
        "suffix": ("", "suffix is not supported"),
    }

    def prompts(self) -> list[str]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise RequestError(400, "'prompt' must be a string or a non-empty list", "prompt")
        return list(self.prompt)


class ChatMessage(_Strict):
    role: str = Field(min_length=1)
    content: str
    name: Optional[str] = None

    def as_dict(self) -> dict:
        message = {"role": self.role, "content": self.content}
        if self.name is not None:
            message["name"] = self.name
        return message


# apply_chat_template's own arguments: set by the request's fields or not for clients to set.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
        "chat_template", "return_dict", "return_tensors", "padding", "truncation", "max_length",
        "return_assistant_tokens_mask", "tokenizer_kwargs",
    }
)  # fmt: skip


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``: OpenAI's chat schema with vLLM's chat-template fields."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None

    def requested_max_tokens(self) -> Optional[int]:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise RequestError(
                400, "'max_tokens' and 'max_completion_tokens' differ; send one of them",
                "max_completion_tokens",
            )  # fmt: skip
        return self.max_completion_tokens if self.max_completion_tokens is not None else (
            self.max_tokens
        )  # fmt: skip

    def check_supported(self) -> None:
        super().check_supported()
        self.requested_max_tokens()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if self.add_generation_prompt and self.continue_final_message:
            raise RequestError(
                400, "'continue_final_message' needs 'add_generation_prompt': false (the reply "
                "either starts a new assistant turn or continues the last message)",
                "continue_final_message",
            )  # fmt: skip
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise RequestError(
                400, "'continue_final_message' needs an assistant message last", "messages"
            )
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(self.chat_template_kwargs or ()))
        if reserved:
            raise RequestError(
                400, f"'chat_template_kwargs' may not set {', '.join(reserved)}",
                "chat_template_kwargs",
            )  # fmt: skip


# -- validation errors -------------------------------------------------------------------------

# What a field holds, for the fields whose pydantic message would name internal union branches.
_EXPECTED = {
    "prompt": "a string or a non-empty list of strings",
    "stop": "a string or a list of strings",
    "messages": "a non-empty list of {role, content} objects",
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _location(loc: tuple) -> str:
    """('messages', 0, 'content') -> messages[0].content; union branch tags dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = part
        elif "[" in part or part in ("str", "list", "dict", "int", "float", "bool"):
            continue  # a union branch (``list[str]``), not a field
        else:
            out += f".{part}"
    return out


def validation_error(error: ValidationError) -> RequestError:
    """The first problem of a pydantic error as a 400 naming the field (all unknown fields at
    once: a client that sends several learns them together)."""
    errors = error.errors(include_url=False)
    unknown = [_location(e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        names = ", ".join(f"'{name}'" for name in unknown)
        return RequestError(
            400, f"unknown field{'s' if len(unknown) > 1 else ''} {names}: not part of this "
            "endpoint's schema", unknown[0],
        )  # fmt: skip
    first = errors[0]
    field = _location(first["loc"]) or "body"
    top = str(first["loc"][0]) if first["loc"] else ""
    if top in _EXPECTED and field == top:
        message = f"must be {_EXPECTED[top]}"
    else:
        message = first["msg"].replace("Input should be", "must be")
    got = "" if first["type"] == "missing" else f", got {_short(first.get('input'))}"
    if first["type"] == "missing":
        message = "is required"
    return RequestError(400, f"'{field}' {message}{got}", field)


def validate(model: type[BaseModel], body: Any) -> Any:
    """``body`` (parsed JSON) as a ``model`` request, or a RequestError."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as error:
        raise validation_error(error) from None
    request.check_supported()
    return request
