"""Turning next-token logits into tokens: temperature, top-k, top-p, greedy."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_sip.errors import ConfigError


@dataclasses.dataclass
class SamplingConfig:
    """How rollouts are sampled (the paper: temperature 1, top-p 1)."""

    sip_temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""

    sip_top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches this."""

    sip_top_k: int = 0
    """Keep only the k most likely tokens (0: all)."""

    def __post_init__(self):
        if self.sip_temperature < 0:
            raise ConfigError("--sip-temperature", f"must be >= 0, got {self.sip_temperature}")
        if not 0.0 < self.sip_top_p <= 1.0:
            raise ConfigError("--sip-top-p", f"must be in (0, 1], got {self.sip_top_p}")
        if self.sip_top_k < 0:
            raise ConfigError("--sip-top-k", f"must be >= 0, got {self.sip_top_k}")

    @property
    def greedy(self) -> bool:
        return self.sip_temperature == 0.0


def sampling_log_probs(
    logits: torch.Tensor, config: SamplingConfig, vocab_size: Optional[int] = None
) -> torch.Tensor:
    """Log-probabilities of the distribution tokens are drawn from: logits over the full
    vocabulary ``[B, V]`` -> ``[B, V]`` after temperature, top-k and top-p (-inf outside)."""
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        # The embedding table is padded for tensor parallelism: padding ids are never sampled.
        logits = logits.clone()
        logits[..., vocab_size:] = float("-inf")
    if config.greedy:
        best = logits.argmax(dim=-1, keepdim=True)
        out = torch.full_like(logits, float("-inf"))
        return out.scatter_(-1, best, 0.0)
    logits = logits / config.sip_temperature
    if config.sip_top_k:
        kth = torch.topk(logits, min(config.sip_top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.sip_top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top-p (the first always stays).
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= config.sip_top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.log_softmax(logits, dim=-1)


def sample(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator,
    vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits [B, V]`` and its log-probability under the sampling
    distribution. Draws come from ``generator`` only, so equal logits and seeds give equal
    tokens on every rank."""
    log_probs = sampling_log_probs(logits, config, vocab_size)
    if config.greedy:
        tokens = log_probs.argmax(dim=-1)
    else:
        tokens = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(-1)
    return tokens, log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
