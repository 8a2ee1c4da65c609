"""Serves a Megatron checkpoint over an OpenAI-compatible completions API (standard library only).

    python tools/serve_judge.py --load checkpoints/judge --port 8000 --model-name judge
    python -m megatron_sip.pretrain ... --judge-backend openai \\
        --judge-url http://127.0.0.1:8000 --judge-model judge

Endpoints:

- ``GET /v1/models``: the one served model.
- ``POST /v1/completions``: OpenAI's legacy completions schema. ``prompt`` (a string or a list
  of strings), ``max_tokens`` (16; 0 with ``echo`` scores the prompt only), ``temperature`` (1.0;
  0 is greedy), ``top_p``, ``logprobs`` (number of alternatives, at most 20), ``echo``, ``stop``,
  ``seed``. Log-probabilities are the model's full-vocabulary log-softmax (the temperature-1
  distribution), exactly what the colocated judge reads, so a client's verdict from
  ``top_logprobs`` equals the colocated judge's. Generation stops at the tokenizer's end-of-document
  token or a stop string (``finish_reason: "stop"``).
- ``GET /health``: ``{"status": "ok"}`` (no authentication).

The model runs as a world of one process (``--device cuda`` puts it on the first visible GPU);
requests are read by threads and queued for the main thread, which runs one model call at a
time. With ``--api-key-env VAR`` every
``/v1`` request needs ``Authorization: Bearer $VAR``. The server binds 127.0.0.1 unless
``--host`` says otherwise, prints ``serving NAME on http://HOST:PORT`` once ready, and shuts down
cleanly on SIGTERM or SIGINT.
"""

# ruff: noqa: E402
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hmac
import http.server
import json
import logging
import os
import queue
import random
import re
import signal
import sys
import threading
import time
import uuid
import warnings
from typing import Any, Optional

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import torch

from megatron_sip.data.tokenizers import GPTSentencePieceTokenizer
from megatron_sip.errors import ConfigError
from megatron_sip.inference.generation import generate
from megatron_sip.inference.pipeline import pipeline_forward
from megatron_sip.inference.sampling import SamplingConfig, sample
from megatron_sip.initialize import ParallelConfig, destroy_distributed, initialize_distributed
from megatron_sip.log import setup_logging
from megatron_sip.roles.megatron_backend import RoleModel

logger = logging.getLogger("serve_judge")

MAX_TOP_LOGPROBS = 20
MAX_BODY_BYTES = 64 << 20
MIN_LOGPROB = -9999.0  # JSON has no -inf (vLLM's convention)
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_CONTEXT_TOKENS = 8  # tokens before a token that decide how it detokenizes (leading spaces)


class RequestError(Exception):
    """A bad request: answered with ``status`` and an OpenAI-style error object."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


@dataclasses.dataclass
class CompletionRequest:
    prompts: list[str]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    logprobs: Optional[int] = None
    echo: bool = False
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None


def _number(body: dict, key: str, kind: type, default):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"'{key}' must be a number, got {value!r}")
    if kind is int and value != int(value):
        raise RequestError(400, f"'{key}' must be an integer, got {value!r}")
    return kind(value)


def parse_request(body: Any, model_name: str) -> CompletionRequest:
    """Validates a ``/v1/completions`` body."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(
            404, f"the model '{model}' does not exist; this server has '{model_name}'",
            "model_not_found",
        )  # fmt: skip
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise RequestError(400, "'prompt' must be a string or a non-empty list of strings")
    if _number(body, "n", int, 1) != 1 or _number(body, "best_of", int, 1) != 1:
        raise RequestError(400, "only n = 1 and best_of = 1 are supported")
    request = CompletionRequest(
        prompts=prompts,
        max_tokens=_number(body, "max_tokens", int, 16),
        temperature=_number(body, "temperature", float, 1.0),
        top_p=_number(body, "top_p", float, 1.0),
        logprobs=_number(body, "logprobs", int, None),
        echo=bool(body.get("echo", False)),
        seed=_number(body, "seed", int, None),
    )
    stop = body.get("stop")
    if isinstance(stop, str):
        request.stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        request.stop = tuple(s for s in stop if s)
    elif stop is not None:
        raise RequestError(400, "'stop' must be a string or a list of strings")
    if request.max_tokens < 0:
        raise RequestError(400, f"'max_tokens' must be >= 0, got {request.max_tokens}")
    if request.temperature < 0:
        raise RequestError(400, f"'temperature' must be >= 0, got {request.temperature}")
    if not 0.0 < request.top_p <= 1.0:
        raise RequestError(400, f"'top_p' must be in (0, 1], got {request.top_p}")
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
        raise RequestError(
            400, f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {request.logprobs}"
        )
    return request


def _finite(value: float) -> float:
    return value if value > MIN_LOGPROB else MIN_LOGPROB


class CompletionEngine:
    """Completions from a :class:`RoleModel` in a world of one process."""

    def __init__(self, role: RoleModel, model_name: str):
        self.role = role
        self.model_name = model_name
        self.tokenizer = role.tokenizer
        self.vocab_size = role.tokenizer.vocab_size
        self.eod = role.tokenizer.eod
        self.seq_length = role.model_config.seq_length
        self._texts: dict[int, str] = {}

    # -- text of tokens -----------------------------------------------------------------------

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

    def _continuation(self, context: list[int], new: list[int]) -> str:
        """The text ``new`` adds after ``context``."""
        context = context[-_CONTEXT_TOKENS:]
        base = self.tokenizer.detokenize(context) if context else ""
        full = self.tokenizer.detokenize(context + new)
        if full.startswith(base):
            return full[len(base) :]
        return self.tokenizer.detokenize(new)

    def _offsets(self, context: list[int], tokens: list[int], start: int) -> list[int]:
        """Character offset of each token in the text it detokenizes to after ``context``."""
        offsets, position, history = [], start, list(context)
        for token in tokens:
            offsets.append(position)
            if token != self.eod:
                position += len(self._continuation(history, [token]))
            history.append(token)
        return offsets

    # -- model calls --------------------------------------------------------------------------

    @torch.no_grad()
    def position_log_probs(self, tokens: list[int]) -> torch.Tensor:
        """Log-softmax over the vocabulary after every position of one sequence, ``[L, V]``."""
        device = self.role.device
        ids = torch.as_tensor([tokens], dtype=torch.long, device=device)
        positions = torch.arange(len(tokens), device=device).unsqueeze(0)
        logits = pipeline_forward(self.role.module, ids, positions, runtime_gather_output=True)
        logits = logits[0].float()
        logits[:, self.vocab_size :] = float("-inf")
        return torch.log_softmax(logits, dim=-1)

    def _generate(
        self, request: CompletionRequest, prompts: list[list[int]]
    ) -> tuple[list[list[int]], list[Optional[torch.Tensor]]]:
        """New tokens per prompt (cut after the first EOD) and, when log-probabilities are
        asked for, the full-vocabulary log-probs at each new token's position ``[N, V]``."""
        sampling = SamplingConfig(sip_temperature=request.temperature, sip_top_p=request.top_p)
        seed = request.seed if request.seed is not None else random.randrange(2**31)
        if request.max_tokens == 0:
            return [[] for _ in prompts], [None for _ in prompts]
        if request.max_tokens == 1:
            # The judge's path: one forward, the colocated judge's numbers exactly.
            log_probs = self.role.next_token_log_probs(prompts)
            generator = torch.Generator(device=log_probs.device).manual_seed(seed)
            drawn, _ = sample(log_probs, sampling, generator, self.vocab_size)
            return [[int(t)] for t in drawn.tolist()], [row.unsqueeze(0) for row in log_probs]
        rollouts = generate(
            self.role.module,
            prompts,
            num_samples=1,
            num_tokens=request.max_tokens,
            sampling=sampling,
            seed=seed,
            eod=self.eod,
            vocab_size=self.vocab_size,
            device=self.role.device,
        )
        new = [rows[0] for rows in rollouts.as_candidates()]
        per_position: list[Optional[torch.Tensor]] = []
        for prompt, tokens in zip(prompts, new):
            if request.logprobs is None:
                per_position.append(None)
                continue
            sequence = prompt + tokens[:-1]
            per_position.append(self.position_log_probs(sequence)[len(prompt) - 1 :])
        return new, per_position

    def _logprob_entries(
        self, log_probs: torch.Tensor, tokens: list[int], top: int
    ) -> tuple[list[float], list[dict[str, float]]]:
        chosen = log_probs.gather(-1, torch.as_tensor(tokens, device=log_probs.device)[:, None])
        chosen_values = [_finite(v) for v in chosen[:, 0].tolist()]
        tops: list[dict[str, float]] = []
        if top > 0:
            values, indices = torch.topk(
                log_probs[:, : self.vocab_size], min(top, self.vocab_size), dim=-1
            )
            values, indices = values.tolist(), indices.tolist()
        else:
            values, indices = [[] for _ in tokens], [[] for _ in tokens]
        for row, token in enumerate(tokens):
            entry: dict[str, float] = {}
            for value, index in zip(values[row], indices[row]):
                entry.setdefault(self.token_text(index), _finite(value))
            entry.setdefault(self.token_text(token), chosen_values[row])
            tops.append(entry)
        return chosen_values, tops

    def complete(self, request: CompletionRequest) -> dict:
        if request.max_tokens >= self.seq_length:
            raise RequestError(
                400, f"'max_tokens' must be below the model's sequence length {self.seq_length}"
            )
        # As the colocated roles: a judge prompt keeps its last seq-length tokens, a generation
        # prompt leaves room for the new tokens.
        limit = self.seq_length if request.max_tokens <= 1 else self.seq_length - request.max_tokens
        prompts = []
        for index, text in enumerate(request.prompts):
            try:
                ids = self.role.encode(text, limit)
            except ValueError as error:  # e.g. NullTokenizer given words
                raise RequestError(400, f"prompt {index}: {error}") from None
            if not ids:
                raise RequestError(400, f"prompt {index} is empty after tokenization")
            prompts.append(ids)
        new, per_position = self._generate(request, prompts)
        choices, completion_tokens = [], 0
        for index, (text, prompt, tokens, log_probs) in enumerate(
            zip(request.prompts, prompts, new, per_position)
        ):
            choice, count = self._choice(request, index, text, prompt, tokens, log_probs)
            choices.append(choice)
            completion_tokens += count
        prompt_tokens = sum(len(p) for p in prompts)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _choice(
        self,
        request: CompletionRequest,
        index: int,
        prompt_text: str,
        prompt: list[int],
        tokens: list[int],
        log_probs: Optional[torch.Tensor],
    ) -> tuple[dict, int]:
        finish = "stop" if tokens and tokens[-1] == self.eod else "length"
        content = tokens[:-1] if finish == "stop" else tokens
        text = self._continuation(prompt, content) if content else ""
        found = [at for at in (text.find(stop) for stop in request.stop) if at != -1]
        if found:
            # A stop string ends the text; the tokens that start before it stay.
            cut, finish = min(found), "stop"
            text = text[:cut]
            offsets = self._offsets(prompt, content, 0)
            tokens = [token for token, offset in zip(content, offsets) if offset < cut]
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
        if request.logprobs is not None:
            choice["logprobs"] = self._logprobs(request, prompt_text, prompt, tokens, log_probs)
        if request.echo:
            choice["text"] = prompt_text + text
        return choice, len(tokens)

    def _logprobs(
        self,
        request: CompletionRequest,
        prompt_text: str,
        prompt: list[int],
        tokens: list[int],
        log_probs: Optional[torch.Tensor],
    ) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}  # fmt: skip
        top = request.logprobs or 0
        if request.echo:
            out["tokens"] += [self.token_text(t) for t in prompt]
            out["text_offset"] += self._offsets([], prompt, 0)
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            if len(prompt) > 1:
                scores = self.position_log_probs(prompt)[:-1]
                chosen, tops = self._logprob_entries(scores, prompt[1:], top)
                out["token_logprobs"] += chosen
                out["top_logprobs"] += tops
        if tokens:
            chosen, tops = self._logprob_entries(log_probs[: len(tokens)], tokens, top)
            out["tokens"] += [self.token_text(t) for t in tokens]
            out["token_logprobs"] += chosen
            out["top_logprobs"] += tops
            out["text_offset"] += self._offsets(prompt, tokens, len(prompt_text))
        return out


class ModelRunner:
    """Runs model calls one at a time on the thread that calls :meth:`run` (the main thread:
    the platform's device adaptations are thread-local, as is the current CUDA device)."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()

    def submit(self, fn, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((future, fn, args))
        return future

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                future, fn, args = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:
                future.set_exception(error)
        while True:  # shutting down: nothing queued is answered
            try:
                future, _, _ = self.jobs.get_nowait()
            except queue.Empty:
                return
            future.cancel()


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "megatron-sip-serve-judge"
    engine: CompletionEngine
    runner: ModelRunner
    api_key: Optional[str] = None

    detailed = False  # a completion that logs its own line

    def log_request(self, code="-", size="-") -> None:
        if not self.detailed:
            logger.info("%s %s %s", self.client_address[0], self.requestline, code)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        logger.info("%s %s", self.client_address[0], format % args)

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def _authorized(self) -> bool:
        if not self.api_key:
            return True
        header = self.headers.get("Authorization", "")
        token = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
        if hmac.compare_digest(token.encode(), self.api_key.encode()):
            return True
        self._error(401, "missing or wrong bearer token", "authentication_error")
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._send(200, {"status": "ok"})
        elif path == "/v1/models":
            if self._authorized():
                name = self.engine.model_name
                self._send(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "owned_by": "megatron-sip"}
                ]})  # fmt: skip
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:  # noqa: N802
        started = time.monotonic()
        path = self.path.split("?")[0].rstrip("/")
        if path != "/v1/completions":
            self._error(404, f"no route {self.path}", "not_found")
            return
        if not self._authorized():
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY_BYTES:
            self._error(400 if length <= 0 else 413, "a JSON body with a Content-Length is needed")
            return
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as error:
            self._error(400, f"the body is not valid JSON: {error}")
            return
        try:
            request = parse_request(body, self.engine.model_name)
            answer = self.runner.submit(self.engine.complete, request).result()
        except concurrent.futures.CancelledError:
            self._error(503, "the server is shutting down", "server_error")
            return
        except RequestError as error:
            self._error(error.status, error.message, error.kind)
            return
        except ConfigError as error:
            self._error(400, str(error))
            return
        except Exception as error:
            logger.exception("completion failed")
            self._error(500, f"{type(error).__name__}: {error}", "server_error")
            return
        self.detailed = True
        self._send(200, answer)
        logger.info(
            "%s completions: %d prompt(s), max_tokens=%d, %d+%d tokens, %.0f ms",
            self.client_address[0],
            len(request.prompts),
            request.max_tokens,
            answer["usage"]["prompt_tokens"],
            answer["usage"]["completion_tokens"],
            1000 * (time.monotonic() - started),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--load", required=True, help="Megatron checkpoint directory to serve.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind.")
    parser.add_argument("--port", type=int, default=8000, help="Port to bind (0: any free one).")
    parser.add_argument(
        "--model-name", default=None, help="Name of the served model. Default: the --load path."
    )
    parser.add_argument(
        "--api-key-env",
        default=None,
        help="Environment variable holding a bearer token that every /v1 request must carry.",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the model's RNG state.")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"--api-key-env: environment variable {args.api_key_env} is not set",
                  file=sys.stderr)  # fmt: skip
            return 2
    # A world of one whatever launcher variables the environment carries.
    context = initialize_distributed(ParallelConfig(), args.device, args.seed, environ={})
    try:
        try:
            role = RoleModel(args.load, ParallelConfig(), context.pg_collection)
        except (FileNotFoundError, ValueError) as error:
            print(f"--load: {error}", file=sys.stderr)
            return 2
        name = args.model_name or args.load
        runner = ModelRunner()
        handler = type(
            "BoundHandler",
            (Handler,),
            {"engine": CompletionEngine(role, name), "runner": runner, "api_key": api_key},
        )
        server = http.server.ThreadingHTTPServer((args.host, args.port), handler)
        server.daemon_threads = True
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
        thread.start()
        host, port = server.server_address[:2]
        print(f"serving {name} on http://{host}:{port}", flush=True)
        runner.run(stop)  # model calls on this thread until SIGTERM / SIGINT
        logger.info("shutting down")
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
