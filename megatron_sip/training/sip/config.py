"""The SIP step's settings (METHOD.md), one dataclass: flags --sip-*."""

from __future__ import annotations

import dataclasses
from typing import Literal

from megatron_sip.errors import ConfigError, require_choice, require_positive


def objective_names() -> tuple[str, ...]:
    """The --sip-loss choices: the objectives table's names (training/sip/objectives.py)."""
    from megatron_sip.training.sip.objectives import OBJECTIVES

    return tuple(OBJECTIVES)


@dataclasses.dataclass
class SIPConfig:
    """How each prefix's candidates become a training signal."""

    sip_loss: str = dataclasses.field(default="online_dpo", metadata={"choices": objective_names})
    """The objective: online_dpo (chosen vs rejected against the EMA reference), rf_nll (NLL of
    the chosen candidate) or sft_rewrite (NLL of the rewrite); see training/sip/objectives.py."""

    sip_num_rollouts: int = 16
    """K: rollouts sampled from the policy per prefix."""

    sip_dpo_beta: float = 0.1
    """beta of the DPO loss."""

    sip_nll_weight: float = 0.0
    """Weight of an added NLL term on the original suffix (its mean over the original suffixes'
    tokens of the global batch, added to the objective's own mean)."""

    sip_curriculum: bool = False
    """Early on choose only between original and rewrite; later let a rollout be chosen when it
    beats the rewrite by --sip-rollout-margin."""

    sip_rollout_warmup_iters: int = 0
    """With --sip-curriculum: steps during which rollouts are never chosen."""

    sip_rollout_margin: float = 0.0
    """With --sip-curriculum: how much a rollout's reward must exceed the rewrite's."""

    sip_min_reward_gap: float = 0.0
    """Skip (and count) pairs whose chosen-rejected reward gap is below this."""

    sip_ref_update_interval: int = 1
    """Update the EMA reference every this many steps."""

    sip_ref_ema_decay: float = 0.99
    """theta_ref <- a * theta_ref + (1 - a) * theta: 1.0 freezes it, 0.0 copies the policy. Kept
    in fp32 (from the optimizer's fp32 main weights) whatever the training precision."""

    sip_fused_logprob: Literal["auto", "on", "off"] = "auto"
    """Candidate log-probs from the final hidden states and the output-layer weight shard, the
    logits made chunk by chunk inside the log-prob op (memory bounded by the chunk, not by all
    candidate tokens x vocabulary): on, off (the model's logits), or auto (on where the op's
    kernel for the device is built)."""

    sip_max_missing_scores: float = 0.1
    """The run saves a checkpoint and stops with an error when more than this share of the scores
    asked of the judge over the last --sip-missing-scores-window steps came back missing (at once
    after a step with none back): a judge that stopped answering must not leave the policy
    training on nothing. 1 never stops."""

    sip_max_missing_rewrites: float = 0.5
    """As --sip-max-missing-scores, for the share of samples whose rewrite is missing (a rewriter
    that stopped answering); 1 never stops."""

    sip_missing_scores_window: int = 5
    """Steps over which the missing shares are measured."""

    def fused_logprob(self, device_type: str) -> bool:
        """Whether the fused path is used on a device of this type."""
        if self.sip_fused_logprob != "auto":
            return self.sip_fused_logprob == "on"
        from megatron_sip.ops.dpo import kernel_module

        return kernel_module("cuda" if device_type == "cuda" else "cpu") is not None

    def __post_init__(self):
        require_choice("--sip-loss", self.sip_loss, objective_names())
        require_choice("--sip-fused-logprob", self.sip_fused_logprob, ("auto", "on", "off"))
        require_positive("--sip-num-rollouts", self.sip_num_rollouts)
        require_positive("--sip-ref-update-interval", self.sip_ref_update_interval)
        require_positive("--sip-missing-scores-window", self.sip_missing_scores_window)
        for flag, share in (
            ("--sip-max-missing-scores", self.sip_max_missing_scores),
            ("--sip-max-missing-rewrites", self.sip_max_missing_rewrites),
        ):
            if not 0.0 <= share <= 1.0:
                raise ConfigError(flag, f"a share in [0, 1], got {share}")
        if not 0.0 <= self.sip_ref_ema_decay <= 1.0:
            raise ConfigError(
                "--sip-ref-ema-decay", f"must be in [0, 1], got {self.sip_ref_ema_decay}"
            )
        if self.sip_dpo_beta <= 0:
            raise ConfigError("--sip-dpo-beta", f"must be positive, got {self.sip_dpo_beta}")
        if self.sip_nll_weight < 0 or self.sip_min_reward_gap < 0:
            raise ConfigError(
                "--sip-nll-weight" if self.sip_nll_weight < 0 else "--sip-min-reward-gap",
                "must be >= 0",
            )
