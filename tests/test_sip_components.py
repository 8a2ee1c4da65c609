"""SIP's selection and curriculum, losses, and the EMA reference."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_sip.errors import ConfigError
from megatron_sip.initialize import destroy_distributed
from megatron_sip.models.checkpointing import load_checkpoint, save_checkpoint
from megatron_sip.models.gpt import build_gpt_model
from megatron_sip.training.sip.config import SIPConfig
from megatron_sip.training.sip.losses import dpo_loss, nll_loss
from megatron_sip.training.sip.reference import EMAReference
from megatron_sip.training.sip.selection import Candidate, select_pair

from . import workers
from .distributed import run_ranks

ORIGINAL, REWRITE = Candidate("original", 0), Candidate("rewrite", 0)


def rollout(i):
    return Candidate("rollout", i)


def test_selection_picks_best_and_worst_with_tie_order():
    sip = SIPConfig()
    picked = select_pair(0.5, 0.7, [0.2, 0.9, 0.1], iteration=0, sip=sip)
    assert (picked.chosen, picked.rejected, picked.gap) == (
        rollout(1),
        rollout(2),
        pytest.approx(0.8),
    )
    # Ties: original > rewrite > rollout; the earliest rollout.
    assert select_pair(0.9, 0.9, [0.9, 0.1], iteration=0, sip=sip).chosen == ORIGINAL
    assert select_pair(0.5, 0.9, [0.9, 0.1], iteration=0, sip=sip).chosen == REWRITE
    assert select_pair(None, None, [0.4, 0.4, 0.1], iteration=0, sip=sip).chosen == rollout(0)
    assert select_pair(0.9, 0.1, [0.3, 0.3], iteration=0, sip=sip).rejected == rollout(0)


def test_selection_skips_missing_and_small_gaps():
    sip = SIPConfig(sip_min_reward_gap=0.2)
    assert select_pair(0.5, None, [0.45, None], iteration=0, sip=sip).skipped == "small_gap"
    assert select_pair(None, None, [None], iteration=0, sip=sip).skipped == "no_chosen"
    assert select_pair(0.9, 0.8, [None, None], iteration=0, sip=sip).skipped == "no_rejected"
    # A missing rollout score is never a default: the scored one is rejected.
    picked = select_pair(0.9, 0.8, [None, 0.3], iteration=0, sip=sip)
    assert (picked.rejected, picked.skipped) == (rollout(1), None)
    # Equal rewards form no pair even with no minimum gap.
    assert select_pair(0.5, None, [0.5], iteration=0, sip=SIPConfig()).skipped == "small_gap"
    # rf_nll and sft_rewrite need no rejected candidate.
    alone = select_pair(0.5, 0.6, [], iteration=0, sip=sip, need_rejected=False)
    assert (alone.chosen, alone.skipped) == (REWRITE, None)


def test_curriculum():
    sip = SIPConfig(sip_curriculum=True, sip_rollout_warmup_iters=10, sip_rollout_margin=0.1)
    # During warm-up rollouts are never chosen, however good.
    assert select_pair(0.2, 0.5, [0.99, 0.1], iteration=5, sip=sip).chosen == REWRITE
    # After it, while the rollouts' mean is below the rewrite's: still not.
    assert select_pair(0.2, 0.5, [0.9, 0.0], iteration=20, sip=sip).chosen == REWRITE
    # Mean above the rewrite: a rollout beating the rewrite by the margin may be chosen...
    assert select_pair(0.2, 0.5, [0.65, 0.55], iteration=20, sip=sip).chosen == rollout(0)
    # ...one that beats it by less may not.
    assert select_pair(0.2, 0.5, [0.58, 0.55], iteration=20, sip=sip).chosen == REWRITE
    with pytest.raises(ConfigError, match="--sip-loss"):
        SIPConfig(sip_loss="ppo")
    with pytest.raises(ConfigError, match="--sip-ref-ema-decay"):
        SIPConfig(sip_ref_ema_decay=1.5)


def test_dpo_loss_and_gradient_by_hand():
    policy_chosen = torch.tensor([-10.0], requires_grad=True)
    policy_rejected = torch.tensor([-12.0], requires_grad=True)
    loss, margin = dpo_loss(
        policy_chosen, policy_rejected, torch.tensor([-11.0]), torch.tensor([-11.5]), beta=0.5
    )
    # margin = (-10 + 11) - (-12 + 11.5) = 1.5; loss = -log sigmoid(0.75)
    assert margin.item() == pytest.approx(1.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.75))), rel=1e-6)
    loss.sum().backward()
    # d/dlp+ = -beta * (1 - sigmoid(beta * margin)); d/dlp- = the opposite.
    expected = -0.5 * (1 - 1 / (1 + math.exp(-0.75)))
    assert policy_chosen.grad.item() == pytest.approx(expected, rel=1e-6)
    assert policy_rejected.grad.item() == pytest.approx(-expected, rel=1e-6)
    total, count = nll_loss(torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    assert (total.item(), count.item()) == (3.0, 2.0)


def ema_worker(root: str) -> None:
    parallel, context = workers.setup()
    chunks, config = workers.build(parallel, context)
    policy = chunks[0]
    params = dict(policy.module.named_parameters())

    def fresh():
        return build_gpt_model(workers.tiny_llama(), config, workers.VOCAB, context.pg_collection)

    def reference(sip):  # fp32 training: the shadow is the forward module
        shadow = fresh()
        return EMAReference(shadow, shadow, policy, None, sip)

    frozen = reference(SIPConfig(sip_ref_ema_decay=1.0))
    copying = reference(SIPConfig(sip_ref_ema_decay=0.0, sip_ref_update_interval=2))
    ema = reference(SIPConfig(sip_ref_ema_decay=0.9))
    start = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    for reference in (frozen, copying, ema):
        reference.maybe_update(iteration=1)
    for name, p in frozen.module.named_parameters():
        assert torch.equal(p, start[name])  # 1.0: never changes
    for name, p in copying.module.named_parameters():
        assert torch.equal(p, start[name])  # interval 2: not yet
    assert copying.maybe_update(iteration=2)
    for name, p in copying.module.named_parameters():
        assert torch.equal(p, params[name])  # 0.0: a copy at the interval
    for name, p in ema.module.named_parameters():
        torch.testing.assert_close(p, 0.9 * start[name] + 0.1 * params[name])
    # It survives save and load, beside the policy.
    save_checkpoint(root, 1, chunks, extra_modules=ema.checkpoint_modules())
    expected = {name: p.detach().clone() for name, p in ema.module.named_parameters()}
    restored = fresh()
    load_checkpoint(root, chunks, extra_modules={"reference": restored})
    for name, p in restored.named_parameters():
        assert torch.equal(p, expected[name]), name
    destroy_distributed()


@pytest.mark.slow
def test_ema_reference(tmp_path):
    run_ranks(ema_worker, 1, str(tmp_path / "ckpt"))
