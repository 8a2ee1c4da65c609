"""GRPO's advantages and clipped objective (training/grpo.py) against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_sip.errors import ConfigError
from megatron_sip.training.grpo import GRPOConfig, group_advantages, grpo_loss


def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    advantages = group_advantages(rewards)
    assert advantages[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert advantages[1].tolist() == [0.0] * 4  # no spread, no signal
    # One right of four: mean 0.25, std sqrt(3)/4.
    spread = math.sqrt(3) / 4
    expected = [-0.25 / spread] * 3 + [0.75 / spread]
    assert advantages[2].tolist() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="generations >= 2"):
        group_advantages(torch.ones(3, 1))


def _case(ratio: float, advantage: float, length: int = 1):
    log_probs = torch.full((1, length), math.log(0.5) + math.log(ratio), requires_grad=True)
    old = torch.full((1, length), math.log(0.5))
    return log_probs, old, torch.tensor([advantage]), torch.ones(1, length)


@pytest.mark.parametrize(
    "ratio, advantage, gradient",
    [
        (1.0, 2.0, -2.0),  # on policy: -A d(rho)/d(log p) = -A
        (1.1, 2.0, -2.2),  # inside the clip range: -A rho
        (1.5, 2.0, 0.0),  # past 1 + eps with A > 0: clipped, no gradient
        (1.5, -2.0, 3.0),  # past 1 + eps with A < 0: not clipped (pessimistic min)
        (0.5, -2.0, 0.0),  # below 1 - eps with A < 0: clipped
        (0.5, 2.0, -1.0),  # below 1 - eps with A > 0: not clipped
    ],
)
def test_clipped_surrogate_gradient(ratio, advantage, gradient):
    log_probs, old, advantages, mask = _case(ratio, advantage)
    result = grpo_loss(log_probs, old, advantages, mask, clip_epsilon=0.2)
    result.loss.backward()
    assert log_probs.grad.item() == pytest.approx(gradient, abs=1e-5)
    assert result.clipped_fraction.item() == (1.0 if gradient == 0.0 else 0.0)
    assert result.kl is None


def test_tokens_average_per_generation_then_over_generations_and_mask():
    # Two generations of 1 and 3 tokens (the second padded to 4): each counts once.
    log_probs = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 1, 0]])
    result = grpo_loss(log_probs, torch.zeros(2, 4), torch.tensor([1.0, -1.0]), mask, 0.2)
    assert result.loss.item() == pytest.approx(0.5 * (-1.0 + 1.0))
    result.loss.backward()
    expected = torch.tensor([[-0.5, 0, 0, 0], [0.5 / 3, 0.5 / 3, 0.5 / 3, 0]])
    assert torch.allclose(log_probs.grad, expected, atol=1e-6)  # padding gets nothing
    with pytest.raises(ValueError, match="at least one generated token"):
        grpo_loss(log_probs, torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, 4), 0.2)


def test_kl_penalty_is_k3_to_the_reference():
    log_probs = torch.tensor([[math.log(0.5), math.log(0.25)]], requires_grad=True)
    reference = torch.tensor([[math.log(0.5), math.log(0.5)]])
    result = grpo_loss(log_probs, log_probs.detach(), torch.zeros(1), torch.ones(1, 2), 0.2,
                       reference_log_probs=reference, kl_coef=0.5)  # fmt: skip
    # Token 1 agrees (KL 0); token 2: q = log 2, exp(q) - q - 1 = 1 - log 2.
    assert result.kl.item() == pytest.approx((1 - math.log(2)) / 2, abs=1e-6)
    assert result.loss.item() == pytest.approx(0.5 * result.kl.item(), abs=1e-6)
    result.loss.backward()
    # d/d(log p) of 0.5 * mean_t (exp(q) - q - 1) = 0.5 * (1 - exp(q)) / 2.
    assert log_probs.grad[0].tolist() == pytest.approx([0.0, 0.25 * (1 - 2.0)], abs=1e-6)
    with pytest.raises(ValueError, match="needs the reference"):
        grpo_loss(log_probs, log_probs.detach(), torch.zeros(1), torch.ones(1, 2), 0.2,
                  kl_coef=0.1)  # fmt: skip


def test_config_defaults_and_refusals():
    config = GRPOConfig()
    assert (config.grpo_group_size, config.grpo_temperature, config.grpo_top_p) == (16, 0.6, 0.6)
    for field, value, flag in (("grpo_group_size", 1, "--grpo-group-size"),
                               ("grpo_top_p", 0.0, "--grpo-top-p"),
                               ("grpo_clip_epsilon", 0.0, "--grpo-clip-epsilon"),
                               ("grpo_kl_coef", -1.0, "--grpo-kl-coef")):  # fmt: skip
        with pytest.raises(ConfigError, match=flag):
            GRPOConfig(**{field: value})
