"""SIP's objectives (``--sip-loss``), each one component: what it needs (a judge, rollouts, the EMA
reference), how it picks its candidates, which candidates it scores, and its loss (METHOD steps
5 and 6). The builder, the candidate collector, the batches and the trainer consult
:data:`OBJECTIVES`; adding an objective is one class here and one entry in the table.

A loss is a sum over this micro-batch's units plus their count, as in Megatron's loss contract:
the step divides the sum over the global batch by the count over the global batch, so the loss is
a mean over all usable pairs (online DPO) or all candidate tokens (the NLL objectives) of the
global batch, whatever the micro-batch they fell in.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from megatron_sip.training.sip.losses import dpo_loss
from megatron_sip.training.sip.selection import REWRITE, Candidate, Selection, select_pair

if TYPE_CHECKING:
    from megatron_sip.training.sip.candidates import ScoredSample
    from megatron_sip.training.sip.config import SIPConfig


@dataclasses.dataclass
class LossTerm:
    """An objective's loss on one micro-batch: the sum over its units, their count, and
    ``{name: [sum, count]}`` reports (averaged over the global batch for logging)."""

    total: torch.Tensor
    count: torch.Tensor
    reports: dict[str, torch.Tensor]


class Objective(abc.ABC):
    name: ClassVar[str]
    needs_judge: ClassVar[bool]
    """Candidates are judged and rewarded (the pair is chosen by reward)."""
    needs_rollouts: ClassVar[bool]
    """The policy samples --sip-num-rollouts suffixes per prefix."""
    needs_reference: ClassVar[bool]
    """The EMA reference scores the candidates (and is updated, saved, restored)."""
    num_columns: ClassVar[int]
    """Candidates per prefix the loss scores, in the order :meth:`columns` returns them."""
    unit: ClassVar[str]
    """What the loss is a mean over: pairs or tokens."""

    @abc.abstractmethod
    def select(self, sample: ScoredSample, *, iteration: int, sip: SIPConfig) -> Selection:
        """The prefix's (chosen, rejected) candidates from its rewards (METHOD step 5)."""

    @abc.abstractmethod
    def columns(self, sample: ScoredSample) -> Optional[list[list[int]]]:
        """The token lists the loss scores, or None when the prefix has nothing to train on."""

    @abc.abstractmethod
    def units(self, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """How many units each row holds, [B]: ``tokens`` [B, C] candidate lengths, ``weights``
        [B] 1 for a prefix that trains and 0 for a placeholder."""

    @abc.abstractmethod
    def loss(
        self,
        policy: torch.Tensor,
        reference: Optional[torch.Tensor],
        tokens: torch.Tensor,
        weights: torch.Tensor,
        sip: SIPConfig,
    ) -> LossTerm:
        """The loss from sequence log-probs ``policy`` [B, C] (and ``reference`` [B, C])."""


class OnlineDPO(Objective):
    """-log sigmoid(beta * ((lp+ - ref+) - (lp- - ref-))), chosen = best of original, rewrite and
    rollouts, rejected = worst rollout; the mean over usable pairs."""

    name = "online_dpo"
    needs_judge, needs_rollouts, needs_reference = True, True, True
    num_columns, unit = 2, "pairs"

    def select(self, sample, *, iteration, sip):
        rewards = sample.rewards
        return select_pair(
            rewards.original, rewards.rewrite, rewards.rollouts, iteration=iteration, sip=sip
        )

    def columns(self, sample):
        selection = sample.selection
        if selection.skipped is not None:
            return None
        return [sample.tokens(selection.chosen), sample.tokens(selection.rejected)]

    def units(self, tokens, weights):
        return weights

    def loss(self, policy, reference, tokens, weights, sip):
        losses, margins = dpo_loss(
            policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], sip.sip_dpo_beta
        )
        used = weights.sum()
        total = (losses * weights).sum()
        chosen_ratio = (policy[:, 0] - reference[:, 0]).detach()
        reports = {
            "dpo loss": torch.stack([total.detach(), used]),
            "dpo margin": torch.stack([(margins * weights).sum(), used]),
            "preference accuracy": torch.stack([((margins > 0).float() * weights).sum(), used]),
            # Per token, on the chosen side: mostly the original or the rewrite, which are not
            # policy samples, so this is not a KL (sip/kl-rollouts is).
            "chosen log-ratio": torch.stack(
                [(chosen_ratio * weights).sum(), (tokens[:, 0] * weights).sum()]
            ),
        }
        return LossTerm(total, used, reports)


class _ChosenNLL(Objective):
    """NLL of one chosen candidate per prefix, the mean over its tokens."""

    needs_reference = False
    num_columns, unit = 1, "tokens"

    def columns(self, sample):
        chosen = sample.selection.chosen
        return None if chosen is None else [sample.tokens(chosen)]

    def units(self, tokens, weights):
        return tokens[:, 0] * weights

    def loss(self, policy, reference, tokens, weights, sip):
        total = -(policy[:, 0] * weights).sum()
        count = self.units(tokens, weights).sum()
        return LossTerm(total, count, {"chosen nll": torch.stack([total.detach(), count])})


class RFNLL(_ChosenNLL):
    """Rejection-sampling fine-tuning: NLL of the best of original, rewrite and rollouts."""

    name = "rf_nll"
    needs_judge, needs_rollouts = True, True

    def select(self, sample, *, iteration, sip):
        rewards = sample.rewards
        return select_pair(
            rewards.original,
            rewards.rewrite,
            rewards.rollouts,
            iteration=iteration,
            sip=sip,
            need_rejected=False,
        )


class SFTRewrite(_ChosenNLL):
    """NLL of the rewrite (the paper's weakest baseline): no judge, no rollouts."""

    name = "sft_rewrite"
    needs_judge, needs_rollouts = False, False

    def select(self, sample, *, iteration, sip):
        if sample.rewrite is None:
            return Selection(None, None, skipped="no_chosen")
        return Selection(Candidate(REWRITE, 0), None)


OBJECTIVES: dict[str, Objective] = {
    objective.name: objective for objective in (OnlineDPO(), RFNLL(), SFTRewrite())
}

# SIPConfig settings read only by objectives with a given need: set for an objective without
# it, they would be ignored, so the job refuses them (train_sip.SIPJobConfig.validate).
REFERENCE_SETTINGS = ("sip_dpo_beta", "sip_ref_update_interval", "sip_ref_ema_decay")
ROLLOUT_SETTINGS = (
    "sip_num_rollouts",
    "sip_curriculum",
    "sip_rollout_warmup_iters",
    "sip_rollout_margin",
)
JUDGE_SETTINGS = ("sip_min_reward_gap", "sip_max_missing_scores")
