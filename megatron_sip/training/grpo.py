"""GRPO's pieces (METHOD.md, "Rewriter and judge training"): group-relative advantages and the
clipped policy-gradient objective with an optional KL to a frozen start.

For each prompt the policy samples a group of G generations; each gets a scalar reward (for the
judge: 1 when its parsed verdict matches the label, else 0). A generation's advantage is its
reward normalised within its group, ``(r - mean) / (std + eps)``: no value model, and a group
whose generations all earn the same reward carries no signal (advantage 0). The objective is
PPO's clipped surrogate per token, averaged over each generation's tokens and then over
generations (the GRPO paper's normalisation), so a long generation does not outweigh a short
one:

    L = -1/N sum_i 1/|o_i| sum_t [min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) - beta KL_t]
    rho = exp(log pi(o_it) - log pi_old(o_it)),  KL_t = exp(q) - q - 1,  q = log pi_ref - log pi

``KL_t`` is the non-negative, unbiased "k3" estimate of KL(pi || pi_ref) from the sampled
tokens (zero where the two agree). These functions take per-token log-probs, so they serve any
generation length: the judge's one verdict token as much as a rewriter's suffix.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_sip.errors import ConfigError, require_positive


@dataclasses.dataclass
class GRPOConfig:
    """GRPO's settings (flags --grpo-*); defaults from METHOD.md."""

    grpo_group_size: int = 16
    """G: generations sampled per prompt."""

    grpo_temperature: float = 0.6
    """Sampling temperature of the generations."""

    grpo_top_p: float = 0.6
    """Nucleus (top-p) sampling of the generations."""

    grpo_clip_epsilon: float = 0.2
    """The surrogate's clip range: the probability ratio to the sampling policy is kept within
    [1 - eps, 1 + eps] where moving it further would help the objective."""

    grpo_kl_coef: float = 0.0
    """Weight of the KL penalty to the frozen start (the SFT model); 0 adds none."""

    grpo_updates_per_batch: int = 1
    """Optimizer steps taken on each batch of generations (GRPO's mu). The first is on-policy
    (the ratio is 1); later ones are where --grpo-clip-epsilon bounds the ratio."""

    def __post_init__(self):
        require_positive("--grpo-group-size", self.grpo_group_size)
        if self.grpo_group_size < 2:
            raise ConfigError("--grpo-group-size", "a group needs at least 2 generations")
        if self.grpo_temperature <= 0:
            raise ConfigError("--grpo-temperature", "must be positive (sampling)")
        if not 0.0 < self.grpo_top_p <= 1.0:
            raise ConfigError("--grpo-top-p", f"must be in (0, 1], got {self.grpo_top_p}")
        if self.grpo_clip_epsilon <= 0:
            raise ConfigError("--grpo-clip-epsilon", "must be positive")
        require_positive("--grpo-updates-per-batch", self.grpo_updates_per_batch)
        if self.grpo_kl_coef < 0:
            raise ConfigError("--grpo-kl-coef", "must be >= 0")


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``[P, G]`` rewards (P prompts, G generations each) -> advantages normalised within each
    group: zero mean, unit (population) standard deviation; all zero in a group whose rewards
    are all equal."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, generations >= 2], got {list(rewards.shape)}")
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    spread = rewards.std(dim=1, unbiased=False, keepdim=True)
    advantages = torch.where(spread > eps, centred / (spread + eps), torch.zeros_like(centred))
    return advantages.float()


@dataclasses.dataclass
class GRPOLoss:
    """The objective over a batch of generations, and what it measured."""

    loss: torch.Tensor
    """The mean over generations of their per-token mean loss (differentiable)."""

    clipped_fraction: torch.Tensor
    """Share of generated tokens whose ratio was clipped (the surrogate's gradient is zero)."""

    kl: Optional[torch.Tensor]
    """Mean per-token k3 KL estimate to the reference; None without reference log-probs."""


def grpo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_epsilon: float,
    reference_log_probs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
) -> GRPOLoss:
    """The clipped GRPO objective (module docstring) for ``[N, T]`` per-token log-probs of N
    generations under the policy being trained (``log_probs``), the policy that sampled them
    (``old_log_probs``) and optionally the frozen reference; ``advantages`` ``[N]``; ``mask``
    ``[N, T]`` marks generated tokens (each generation has at least one)."""
    if log_probs.shape != old_log_probs.shape or log_probs.shape != mask.shape:
        raise ValueError("log_probs, old_log_probs and mask must have one shape [N, T]")
    if advantages.shape != log_probs.shape[:1]:
        raise ValueError(f"advantages must be [N], got {list(advantages.shape)}")
    mask = mask.to(log_probs.dtype)
    lengths = mask.sum(dim=1)
    if bool((lengths <= 0).any()):
        raise ValueError("every generation needs at least one generated token in mask")
    ratio = torch.exp(log_probs - old_log_probs.detach())
    advantage = advantages.to(log_probs.dtype).unsqueeze(1)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * advantage
    per_token = -torch.minimum(unclipped, clipped)
    kl = None
    if reference_log_probs is not None:
        gap = reference_log_probs.detach() - log_probs
        kl_tokens = torch.exp(gap) - gap - 1.0
        per_token = per_token + kl_coef * kl_tokens
        kl = ((kl_tokens * mask).sum() / mask.sum()).detach()
    elif kl_coef:
        raise ValueError("a KL penalty needs the reference's log-probs")
    per_generation = (per_token * mask).sum(dim=1) / lengths
    was_clipped = (clipped < unclipped).to(mask.dtype) * mask
    return GRPOLoss(
        loss=per_generation.mean(),
        clipped_fraction=(was_clipped.sum() / mask.sum()).detach(),
        kl=kl,
    )
