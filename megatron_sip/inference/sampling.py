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
        tokens = draw(log_probs, generator)
    return tokens, log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


BLOCK = 256  # vocabulary entries per block of the two-level draw


def draw(log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One exact draw per row of the categorical ``exp(log_probs) [B, V]`` by inverting its
    cumulative distribution with one uniform number per row (``torch.multinomial`` draws V
    exponential numbers per row instead: a quarter of a CPU rollout's time at V = 32,000).

    Two levels keep it exact without a float64 pass over the vocabulary (a cumulative sum over
    all V tokens in fp32 would move the boundaries of the rarest tokens by more than their
    probability): a block of :data:`BLOCK` tokens is drawn from the blocks' fp32 sums (each
    within a relative rounding error of its exact mass, however small that mass), then a token
    within it; both by float64 cumulative sums over short vectors. Tokens of probability zero
    are never drawn: the cumulative sums are flat across them."""
    rows, vocab = log_probs.shape
    probs = log_probs.exp()
    if vocab % BLOCK:
        probs = torch.nn.functional.pad(probs, (0, BLOCK - vocab % BLOCK))
    blocks = probs.view(rows, -1, BLOCK)
    block_mass = blocks.sum(-1).double()  # [B, blocks]
    uniform = torch.rand(rows, 1, generator=generator, device=probs.device, dtype=torch.float64)
    block = _invert(block_mass, uniform)  # [B]
    within = blocks[torch.arange(rows, device=probs.device), block].double()  # [B, BLOCK]
    # The uniform number's position inside the chosen block's share, rescaled to its mass.
    below = block_mass.cumsum(-1).gather(-1, block[:, None]) - block_mass.gather(-1, block[:, None])
    total = block_mass.sum(-1, keepdim=True)
    residual = (uniform * total - below).clamp(min=0.0)
    token = _invert(within, residual / within.sum(-1, keepdim=True).clamp(min=1e-300))
    return block * BLOCK + token


def _invert(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the index i where ``uniform`` [B, 1] (a fraction of the row's total weight)
    falls in the cumulative weights [B, n]: never an index of weight zero."""
    cumulative = weights.cumsum(-1)
    index = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True).squeeze(-1)
    # A fraction within rounding of 1 can land past the last index of nonzero weight.
    last = weights.shape[-1] - 1 - (weights.flip(-1) > 0).int().argmax(-1)
    return torch.minimum(index, last)
