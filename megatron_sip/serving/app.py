"""The HTTP API (FastAPI): ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions``.

A route reads the body itself (capped at --max-body-bytes, 413 beyond, before it is all read),
parses it strictly (:mod:`~megatron_sip.serving.protocol`), tokenizes on a worker thread, hands
the model work to the scheduler and awaits it without holding a thread, then formats the answer
on a worker thread. Every error is a JSON error body with a 4xx naming the cause, except what
the server did wrong: a 500 that says "internal error" (the exception goes to the log only).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from megatron_sip.serving.engine import CompletionEngine, Job
from megatron_sip.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    error_body,
    parse_json,
    validate,
)
from megatron_sip.serving.scheduler import Scheduler, SchedulerClosed

logger = logging.getLogger("serve_judge")


def error_response(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 413:
        headers = {"Connection": "close"}  # a client sending that much is not kept
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


DISCONNECT_POLL_S = 0.5
"""How often a request waiting for the model checks that its client is still there."""
DRAIN_FACTOR = 16
"""An oversized body up to this many times --max-body-bytes is read and dropped before the 413:
closing a connection with unread data makes the kernel reset it, and the client might never
see the answer. Beyond it the connection is closed at once."""


def _too_large(limit: int, size: str) -> RequestError:
    return RequestError(
        413, f"the body {size}; this server takes at most {limit} bytes (--max-body-bytes)"
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 when it exceeds ``limit`` bytes (known from Content-Length, else
    found while reading a chunked body)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"Content-Length {declared[:20]!r} is not a byte count")
        if int(declared) > limit * DRAIN_FACTOR:
            raise _too_large(limit, f"has {declared} bytes")
    too_large = declared is not None and int(declared) > limit
    body, received = bytearray(), 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit * DRAIN_FACTOR:
            raise _too_large(limit, f"exceeds {limit * DRAIN_FACTOR} bytes")
        if not too_large:
            body += chunk
            too_large = len(body) > limit
    if too_large:
        raise _too_large(limit, f"has {received} bytes")
    return bytes(body)


def build_app(
    engine: CompletionEngine,
    scheduler: Scheduler,
    *,
    max_body_bytes: int,
    api_key: Optional[str] = None,
) -> FastAPI:
    """The API over ``engine`` and ``scheduler``; with ``api_key`` every /v1 route needs
    ``Authorization: Bearer <api_key>``."""
    app = FastAPI(title="megatron-sip serve_judge", docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    started = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = {404: "no such route", 405: "method not allowed on this route"}.get(
            error.status_code, str(error.detail)
        )
        return error_response(error.status_code, f"{message}: {request.url.path}")

    @app.exception_handler(Exception)
    async def internal_error(_request, error: Exception):
        logger.error("unhandled error", exc_info=error)
        return error_response(500, "internal error")

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer ...)")

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != engine.model_name:
            raise RequestError(
                404, f"the model '{name}' does not exist; this server has '{engine.model_name}'",
                "model",
            )  # fmt: skip

    async def wait(request: Request, works) -> list:
        """The results of ``works``; when the client goes away meanwhile, its prompts not yet
        run are dropped (uvicorn does not cancel a request's task on disconnect)."""
        results = asyncio.wrap_future(scheduler.submit(works))
        while True:
            done, _ = await asyncio.wait({results}, timeout=DISCONNECT_POLL_S)
            if done:
                return results.result()
            if await request.is_disconnected():
                results.cancel()  # cancels the scheduler's future too
                raise ClientDisconnect()

    async def run(request: Request, job: Job) -> None:
        """The job's model work through the scheduler: new tokens, then scores."""
        job.take_first(await wait(request, job.first_works()))
        works = job.score_works()
        if works:
            job.take_scores(await wait(request, works))

    async def answer(
        request: Request,
        schema: type,
        make_job: Callable[[object], Job],
        respond: Callable[[Job], dict],
    ) -> JSONResponse:
        begun = time.monotonic()
        try:
            authorize(request)
            body = parse_json(await read_body(request, max_body_bytes))
            parsed = validate(schema, body)
            check_model(parsed.model)
            job = await run_in_threadpool(make_job, parsed)
            await run(request, job)
            payload = await run_in_threadpool(respond, job)
        except RequestError as error:
            return error_response(error.status, error.message, error.param)
        except SchedulerClosed:
            return error_response(503, "the server is shutting down")
        except ClientDisconnect:  # nobody reads the answer
            logger.info("%s: the client went away", request.url.path)
            return error_response(400, "the client closed the connection")
        except Exception:
            logger.exception("%s failed", request.url.path)
            return error_response(500, "internal error")
        logger.info(
            "%s %s: %d prompt(s), max_tokens=%d, %d+%d tokens, %.0f ms",
            request.client.host if request.client else "-",
            request.url.path,
            len(job.choices),
            job.settings.max_tokens,
            payload["usage"]["prompt_tokens"],
            payload["usage"]["completion_tokens"],
            1000 * (time.monotonic() - begun),
        )
        return JSONResponse(payload)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            authorize(request)
        except RequestError as error:
            return error_response(error.status, error.message)
        return {"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": started,
            "owned_by": "megatron-sip", "max_model_len": engine.seq_length,
        }]}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(
            request, CompletionRequest, engine.completion_job, engine.completion_response
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, ChatCompletionRequest, engine.chat_job, engine.chat_response)

    return app
