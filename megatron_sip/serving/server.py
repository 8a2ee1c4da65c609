"""The serving process: uvicorn on a thread, the model on the main thread, every rank in step.

Rank 0 binds the socket, runs uvicorn (FastAPI) on a thread of its own and the scheduler on the
main thread: the platform's device adaptations and the current CUDA device are per thread, so
every model call runs there. With tensor or pipeline parallelism (under torchrun) the other ranks
build the same model and follow rank 0's calls (:class:`~megatron_sip.serving.worker.OpChannel`).

SIGTERM or SIGINT on rank 0 stops it cleanly: no new connections, queued requests answered 503,
the followers told to stop, exit 0. The followers ignore those signals (torchrun forwards them to
every rank) and end on rank 0's word, so that no rank leaves a collective half done.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Optional

import h11
from uvicorn import Config as UvicornConfig
from uvicorn import Server as UvicornServer
from uvicorn.protocols.http.h11_impl import H11Protocol

from megatron_sip.errors import ConfigError
from megatron_sip.initialize import (
    ParallelConfig,
    destroy_distributed,
    initialize_distributed,
    launch_env,
)
from megatron_sip.platform import PlatformConfig
from megatron_sip.serving.config import ServingConfig, check_exposure

logger = logging.getLogger("serve_judge")


class IdleTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, with the idle timeout applying to every idle connection.

    uvicorn starts its keep-alive timer only once a response is complete, and stops it at the
    first byte of the next request: a client that connects and sends nothing, or sends half a
    request, holds its connection forever. Here the timer also starts on connecting, and a
    request must then arrive whole (headers and body) before it fires; while the model works on
    a request no timer runs."""

    def _arm(self) -> None:
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._expire)

    def _request_whole(self) -> bool:
        return self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        deadline, self.timeout_keep_alive_task = self.timeout_keep_alive_task, None
        super().data_received(data)
        rearmed = self.timeout_keep_alive_task is not None  # a response completed meanwhile
        if rearmed or self.transport.is_closing() or self._request_whole():
            if deadline is not None:
                deadline.cancel()
        else:
            self.timeout_keep_alive_task = deadline  # the request is not whole yet

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined request whose headers came with the last one is not timed by uvicorn.
        if self.timeout_keep_alive_task is None and not self.transport.is_closing():
            if not self._request_whole():
                self._arm()

    def _expire(self) -> None:
        if self.transport.is_closing():
            return
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass  # mid-request: closing the transport is all there is to do
        self.transport.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket; uvicorn listens on it with --backlog."""
    family, kind, proto, _, _ = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    # The protocol number matters: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
    # and without it each response waits on the client's delayed ACK (~40 ms).
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError("--port", f"cannot bind {host}:{port}: {error.strerror}") from None
    sock.set_inheritable(True)
    return sock


class HttpThread:
    """uvicorn serving ``app`` on ``sock`` from a daemon thread."""

    def __init__(self, app, sock: socket.socket, config: ServingConfig):
        self.sock = sock
        self.server = UvicornServer(
            UvicornConfig(
                app,
                http=IdleTimeoutProtocol,
                lifespan="off",
                log_config=None,
                access_log=False,
                server_header=False,
                backlog=config.backlog,
                timeout_keep_alive=config.idle_timeout,
                timeout_graceful_shutdown=5,
            )
        )
        self.thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self.failed: Optional[BaseException] = None

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as error:  # noqa: BLE001 (reported by start/join)
            self.failed = error
            logger.exception("the HTTP server failed")

    def start(self, timeout: float = 60.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start: {self.failed!r}")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def api_key_from_env(config: ServingConfig) -> Optional[str]:
    if not config.api_key_env:
        return None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise ConfigError("--api-key-env", f"environment variable {config.api_key_env} is not set")
    return key


def serve(config: ServingConfig, platform: PlatformConfig, parallel: ParallelConfig) -> int:
    """Serves ``config.load`` until SIGTERM or SIGINT; the exit status (0 on a clean stop).
    Bad settings raise :class:`ConfigError` before the model is loaded."""
    from megatron_sip.roles.megatron_backend import RoleModel
    from megatron_sip.serving.app import build_app
    from megatron_sip.serving.engine import CompletionEngine
    from megatron_sip.serving.scheduler import Scheduler
    from megatron_sip.serving.worker import ModelWorker, OpChannel

    api_key = api_key_from_env(config)
    check_exposure(config, api_key)
    distributed = parallel.model_parallel_size > 1
    # A world of one ignores launcher variables (a SLURM allocation's, say); a model-parallel
    # world is torchrun's (or SLURM's), of exactly one model replica.
    environ = None if distributed else {}
    launched = launch_env(environ if distributed else None)
    if launched.world_size != parallel.model_parallel_size and (
        distributed or launched.launcher == "torchrun"
    ):
        raise ConfigError(
            "--tensor-model-parallel-size",
            f"the server runs one model replica: launch TP x PP = "
            f"{parallel.model_parallel_size} rank(s), not {launched.world_size}",
        )
    leader = launched.rank == 0 or not distributed
    # Bound before the model loads: a busy port fails at once.
    sock = bind_socket(config.host, config.port) if leader else None
    context = initialize_distributed(parallel, platform.device, config.seed, environ=environ)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, (lambda *_: stop.set()) if leader else signal.SIG_IGN)
    channel: Optional[OpChannel] = None
    try:
        try:
            role = RoleModel(config.load, parallel, context.pg_collection)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError("--load", str(error)) from None
        channel = OpChannel(ModelWorker(role), context.world_size)
        if not leader:
            channel.follow()
            channel = None
            return 0
        seq_length = role.model_config.seq_length
        name = config.model_name or config.load
        engine = CompletionEngine(
            role.tokenizer,
            name,
            seq_length,
            config.resolved_max_tokens(seq_length),
            config.max_prompts_per_request,
        )
        scheduler = Scheduler(channel.execute, config.max_batch_prompts, config.max_batch_tokens)
        app = build_app(engine, scheduler, max_body_bytes=config.max_body_bytes, api_key=api_key)
        http = HttpThread(app, sock, config)
        http.start()
        print(f"serving {name} on {url_of(sock)}", flush=True)
        while not stop.is_set() and http.alive:
            if not scheduler.run_next(timeout=0.2):
                channel.idle()
        logger.info("shutting down")
        http.stop()
        scheduler.close()
        while http.alive:  # requests still in flight wait for model calls to finish
            if not scheduler.run_next(timeout=0.05):
                http.join(0.05)
        return 0 if http.failed is None else 1
    finally:
        if channel is not None and leader:
            channel.stop()
        destroy_distributed()


def main(config: ServingConfig, platform: PlatformConfig, parallel: ParallelConfig) -> int:
    """:func:`serve`, with bad settings printed and exit status 2 (as a flag error)."""
    try:
        return serve(config, platform, parallel)
    except ConfigError as error:
        print(f"serve_judge.py: error: {error}", file=sys.stderr, flush=True)
        return 2
