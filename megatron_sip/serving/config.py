"""The server's settings: what it serves, where it listens, and the limits that keep one client
from exhausting it. Each field is a flag of ``tools/serve_judge.py`` (``--max-body-bytes`` ...)."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from typing import Optional

from megatron_sip.errors import ConfigError, require_positive

MAX_TOKENS_DEFAULT_CAP = 512
"""The default of --max-tokens-limit, when the model's sequence length allows it."""


@dataclasses.dataclass
class ServingConfig:
    """A served checkpoint and the server's limits."""

    load: Optional[str] = None
    """Megatron checkpoint directory to serve (any checkpoint of this repository, at any TP/PP)."""

    model_name: Optional[str] = None
    """Name of the served model in requests and answers. Default: the --load path."""

    host: str = "127.0.0.1"
    """Address to bind. A non-loopback address needs --api-key-env: the model would otherwise be
    open to everyone who can reach the port."""

    port: int = 8000
    """Port to bind (0: any free one; the ready line names it)."""

    api_key_env: Optional[str] = None
    """Environment variable holding a bearer token that every /v1 request must carry (401
    otherwise). /health needs none."""

    seed: int = 1234
    """Seed of the model's RNG state."""

    max_batch_prompts: int = 64
    """Prompts that one forward pass takes, gathered round-robin from all queued requests."""

    max_batch_tokens: int = 16384
    """Padded tokens of one forward pass: prompts x longest prompt (plus the new tokens when
    generating). Bounds the logits' memory; a single longer prompt still runs, alone."""

    max_prompts_per_request: int = 256
    """Prompts one request may carry (400 beyond)."""

    max_tokens_limit: Optional[int] = None
    """Largest max_tokens a request may ask for (400 beyond). Default: min(512, the model's
    sequence length - 1)."""

    max_body_bytes: int = 1 << 20
    """Largest request body in bytes (413 beyond)."""

    idle_timeout: float = 5.0
    """Seconds a connection may stay idle: one that connects and sends nothing, one that is
    slow to send its request, and a kept-alive one between requests are closed after it."""

    backlog: int = 2048
    """Connections the listening socket queues before they are accepted."""

    def __post_init__(self):
        if not self.load:
            raise ConfigError("--load", "the checkpoint directory to serve is required")
        for flag, value in (
            ("--max-batch-prompts", self.max_batch_prompts),
            ("--max-batch-tokens", self.max_batch_tokens),
            ("--max-prompts-per-request", self.max_prompts_per_request),
            ("--max-body-bytes", self.max_body_bytes),
            ("--idle-timeout", self.idle_timeout),
            ("--backlog", self.backlog),
        ):
            require_positive(flag, value)
        if self.max_tokens_limit is not None:
            require_positive("--max-tokens-limit", self.max_tokens_limit)
        if not 0 <= self.port <= 65535:
            raise ConfigError("--port", f"must be in [0, 65535], got {self.port}")

    def resolved_max_tokens(self, seq_length: int) -> int:
        """--max-tokens-limit for a model of ``seq_length`` positions: a prompt keeps at least
        one of them."""
        if self.max_tokens_limit is None:
            return min(MAX_TOKENS_DEFAULT_CAP, seq_length - 1)
        if self.max_tokens_limit >= seq_length:
            raise ConfigError(
                "--max-tokens-limit",
                f"{self.max_tokens_limit} leaves no room for a prompt in the model's sequence "
                f"length {seq_length}; use at most {seq_length - 1}",
            )
        return self.max_tokens_limit


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback one (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_exposure(config: ServingConfig, api_key: Optional[str]) -> None:
    """Refuses to serve a non-loopback address without a bearer token."""
    if api_key is None and not is_loopback(config.host):
        raise ConfigError(
            "--host",
            f"{config.host} is not a loopback address, and without --api-key-env anyone who "
            "reaches the port could use the model; set --api-key-env VAR (VAR holding a bearer "
            "token) or bind 127.0.0.1",
        )
