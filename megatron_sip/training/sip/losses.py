"""SIP's losses from sequence log-probs (METHOD step 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ``-log sigmoid(beta * ((lp+ - ref+) - (lp- - ref-)))`` and the margins inside."""
    margins = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margins), margins.detach()


def nll_loss(
    token_log_probs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the masked tokens and their count (Megatron's loss contract)."""
    return -(token_log_probs * mask).sum(), mask.sum()
