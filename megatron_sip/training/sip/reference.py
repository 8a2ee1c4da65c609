"""The EMA reference policy, kept shard-local in the policy's own TP/PP layout.

Every ``--sip-ref-update-interval`` steps, in place: theta_ref <- a * theta_ref + (1 - a) * theta
with a = ``--sip-ref-ema-decay`` (1.0: frozen, 0.0: a periodic hard copy). Each rank holds and
updates only its own shard, so the update needs no communication. It is saved in checkpoints under
the key ``reference`` (``save_checkpoint(..., extra_modules={"reference": module})``).
"""

from __future__ import annotations

import torch

from megatron_sip.models.checkpointing import unwrap_model
from megatron_sip.training.sip.config import SIPConfig


class EMAReference:
    def __init__(
        self, reference_module: torch.nn.Module, policy, sip: SIPConfig, copy_policy: bool = True
    ):
        """``reference_module``: a model of the policy's architecture on this rank (same shard);
        it starts as a copy of the policy unless ``copy_policy`` is False (its weights were
        loaded from a checkpoint)."""
        self.module = reference_module
        self.decay = sip.sip_ref_ema_decay
        self.interval = sip.sip_ref_update_interval
        self.module.eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self._pairs = self._match(policy)
        if copy_policy:
            self.copy_from_policy()

    def _match(self, policy) -> list[tuple[torch.Tensor, torch.Tensor]]:
        policy_params = dict(unwrap_model(policy).named_parameters())
        reference_params = dict(self.module.named_parameters())
        if policy_params.keys() != reference_params.keys():
            raise ValueError("the reference model's parameters do not match the policy's")
        return [(reference_params[name], policy_params[name]) for name in policy_params]

    @torch.no_grad()
    def copy_from_policy(self) -> None:
        for reference, current in self._pairs:
            reference.copy_(current)

    @torch.no_grad()
    def update(self) -> None:
        for reference, current in self._pairs:
            reference.mul_(self.decay).add_(current.detach(), alpha=1.0 - self.decay)

    def maybe_update(self, iteration: int) -> bool:
        """Updates after step ``iteration`` when it is a multiple of the interval."""
        if self.decay == 1.0 or iteration % self.interval:
            return False
        self.update()
        return True
