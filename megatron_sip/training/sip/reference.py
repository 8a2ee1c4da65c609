"""The EMA reference policy, kept shard-local in the policy's own TP/PP layout, in fp32.

Every ``--sip-ref-update-interval`` steps whose optimizer update was applied:
theta_ref <- a * theta_ref + (1 - a) * theta, with a = ``--sip-ref-ema-decay`` (1.0: frozen,
0.0: a periodic hard copy). A skipped optimizer step (gradient overflow) changed no weight, so it
moves no reference either.

Precision: the EMA lives in an fp32 shadow of the policy's shard and reads the optimizer's fp32
main weights (``training.optimizer.fp32_main_params``), whatever the training precision. In bf16
an increment (1 - a) * (theta - theta_ref) below half a bf16 ulp of theta_ref rounds away, so a
bf16 EMA barely moves (300 updates at a = 0.99 toward weights 1% away cover ~2% of the distance
instead of 95%). The reference's forward passes run on a view in the policy's dtype, refreshed
from the shadow after each update; checkpoints hold the fp32 shadow (key ``reference``).

Each rank holds and updates only its own shard; with the distributed optimizer the fp32 main
weights are assembled with one all-reduce over the data-parallel group per update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_sip.models.checkpointing import unwrap_model
from megatron_sip.training.optimizer import fp32_main_params
from megatron_sip.training.sip.config import SIPConfig


class EMAReference:
    def __init__(
        self,
        shadow: torch.nn.Module,
        view: torch.nn.Module,
        policy,
        optimizer,
        sip: SIPConfig,
        copy_policy: bool = True,
    ):
        """``shadow``: a model of the policy's architecture and shard in fp32 (the EMA's state);
        ``view``: the module the reference forward runs, in the policy's dtype (``shadow``
        itself in fp32 training). The reference starts as a copy of the policy unless
        ``copy_policy`` is False (the shadow was loaded from a checkpoint)."""
        self.shadow, self.module = shadow, view
        self.optimizer = optimizer
        self.decay = sip.sip_ref_ema_decay
        self.interval = sip.sip_ref_update_interval
        for module in {id(shadow): shadow, id(view): view}.values():
            module.eval()
            for param in module.parameters():
                param.requires_grad_(False)
        if any(p.dtype != torch.float32 for p in shadow.parameters()):
            raise ValueError("the reference's shadow must be fp32")
        names = list(dict(unwrap_model(policy).named_parameters()))
        shadows, views = dict(shadow.named_parameters()), dict(view.named_parameters())
        if not (set(names) == set(shadows) == set(views)):
            raise ValueError("the reference model's parameters do not match the policy's")
        policy_params = dict(unwrap_model(policy).named_parameters())
        self._policy = [policy_params[name] for name in names]
        self._shadow = [shadows[name] for name in names]
        self._view = [views[name] for name in names]
        if copy_policy:
            self.copy_from_policy()
        else:
            self.refresh_view()

    def _main(self) -> Sequence[torch.Tensor]:
        return fp32_main_params(self.optimizer, self._policy)

    @torch.no_grad()
    def copy_from_policy(self) -> None:
        for shadow, main in zip(self._shadow, self._main()):
            shadow.copy_(main)
        self.refresh_view()

    @torch.no_grad()
    def update(self) -> None:
        for shadow, main in zip(self._shadow, self._main()):
            shadow.mul_(self.decay).add_(main, alpha=1.0 - self.decay)
        self.refresh_view()

    @torch.no_grad()
    def refresh_view(self) -> None:
        """The forward view from the fp32 shadow (rounded once, to the view's dtype)."""
        if self.module is self.shadow:
            return
        for view, shadow in zip(self._view, self._shadow):
            view.copy_(shadow)

    def maybe_update(self, iteration: int, update_successful: bool = True) -> bool:
        """Updates after step ``iteration`` when it is a multiple of the interval and the
        optimizer applied that step's update."""
        if self.decay == 1.0 or iteration % self.interval or not update_successful:
            return False
        self.update()
        return True

    def checkpoint_modules(self) -> dict:
        """What a checkpoint saves: the fp32 shadow."""
        return {"reference": self.shadow}
