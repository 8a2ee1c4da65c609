"""Judge GRPO (megatron_sip.train_judge): the verdict objective on fixed logits, checked by hand.
The run at TP=2 and PP=2 against TP=1 is in test_megatron_roles.py (it needs the SFT judge)."""

from __future__ import annotations

import pytest
import torch

from megatron_sip.train_judge import VerdictMicroBatch, VerdictSampler, grpo_loss_func
from megatron_sip.training.grpo import GRPOConfig

VOCAB = 6  # ids 4 and 5 are the verdicts; the others are parse failures


def batch_with(answer_logits: torch.Tensor) -> tuple[VerdictMicroBatch, torch.Tensor]:
    """Two prompts of length 3 and 2 whose answer positions carry ``answer_logits``."""
    logits = torch.randn(2, 4, VOCAB)
    logits[0, 2], logits[1, 1] = answer_logits[0], answer_logits[1]
    logits.requires_grad_(True)
    batch = VerdictMicroBatch(
        tokens=torch.zeros(2, 4, dtype=torch.long),
        position_ids=torch.arange(4).expand(2, -1),
        answer_at=torch.tensor([2, 1]),
        target=torch.tensor([4, 5]),
        options=torch.tensor([[4, 5], [4, 5]]),
        task=torch.tensor([0, 1]),
    )
    return batch, logits


def test_verdict_objective_is_the_group_normalised_policy_gradient():
    grpo = GRPOConfig(grpo_group_size=8, grpo_temperature=0.5, grpo_top_p=1.0)
    sampler = VerdictSampler(grpo, vocab_size=VOCAB, seed=1)
    answer = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 1.2], [2.0, 0.0, 0.0, 0.0, 0.5, 0.0]])
    batch, logits = batch_with(answer)
    total, count, reports = grpo_loss_func(
        grpo, sampler, ["safety", "pairwise"], 0, 0, batch, None, logits
    )
    samples = batch.samples
    assert samples.shape == (2, 8) and count.item() == 2
    # The same seed, iteration and micro-batch draw the same verdicts (every TP rank alike).
    again, _ = batch_with(answer)
    grpo_loss_func(grpo, sampler, ["safety", "pairwise"], 0, 0, again, None, logits)
    assert torch.equal(again.samples, samples)
    other, _ = batch_with(answer)
    grpo_loss_func(grpo, sampler, ["safety", "pairwise"], 1, 0, other, None, logits)
    assert not torch.equal(other.samples, samples)  # a new step, new draws

    rewards = (samples == batch.target.unsqueeze(1)).double()
    mean, spread = rewards.mean(1, keepdim=True), rewards.std(1, unbiased=False, keepdim=True)
    advantages = torch.where(spread > 1e-6, (rewards - mean) / (spread + 1e-6), 0.0)
    # On-policy the ratio is 1: the loss is -mean(A) per group (0) and its gradient is the
    # policy gradient -1/G sum_g A_g grad log pi(o_g) summed over prompts.
    assert abs(total.item()) < 1e-6
    total.backward()
    expected = torch.zeros(2, VOCAB, dtype=torch.float64)
    log_probs = torch.log_softmax(answer.double() / 0.5, dim=-1)
    for p in range(2):
        for g in range(8):
            onehot = torch.nn.functional.one_hot(samples[p, g], VOCAB).double()
            expected[p] -= advantages[p, g] * (onehot - log_probs[p].exp()) / 0.5 / 8
    got = torch.stack([logits.grad[0, 2], logits.grad[1, 1]]).double()
    assert torch.allclose(got, expected, atol=1e-5)
    assert logits.grad[0, :2].abs().sum() == 0 and logits.grad[1, 2:].abs().sum() == 0

    parsed = ((samples == 4) | (samples == 5)).double()
    assert reports["reward"].tolist() == [rewards.sum().item(), 16.0]
    assert reports["parse failures"].tolist() == [16.0 - parsed.sum().item(), 16.0]
    assert reports["reward/safety"].tolist() == [rewards[0].sum().item(), 8.0]
    # Greedy verdicts: prompt 0 prefers 5 (wrong), prompt 1 prefers 4 (wrong).
    assert reports["accuracy/safety"].tolist() == [0.0, 1.0]
    assert reports["accuracy/pairwise"].tolist() == [0.0, 1.0]


def test_top_p_keeps_a_confident_judge_to_one_verdict_and_the_clip_bounds_later_updates():
    grpo = GRPOConfig(
        grpo_group_size=16, grpo_temperature=0.6, grpo_top_p=0.6, grpo_clip_epsilon=0.2
    )
    sampler = VerdictSampler(grpo, vocab_size=VOCAB, seed=0)
    answer = torch.tensor([[0.0, 0.0, 0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.5, 0.4]])
    batch, logits = batch_with(answer)
    total, _, reports = grpo_loss_func(
        grpo, sampler, ["safety", "pairwise"], 0, 0, batch, None, logits
    )
    # P(4) = 0.99 at T=0.6 fills the nucleus alone: every draw is 4, no spread, no signal.
    assert torch.equal(batch.samples[0], torch.full((16,), 4))
    rewards = (batch.samples == batch.target.unsqueeze(1)).double()
    assert reports["reward spread"].tolist() == [
        pytest.approx(rewards[1].std(unbiased=False).item()),
        2.0,
    ]
    # A second update on the same draws: where the policy moved the right verdict's ratio past
    # 1 + eps, its positive advantage is clipped (no gradient pushes it further).
    moved = logits.detach().clone()
    moved[1, 1, 5] += 5.0  # the right verdict of prompt 1 (target 5) much likelier
    moved.requires_grad_(True)
    first_old = batch.old_log_probs.clone()
    _, _, second = grpo_loss_func(grpo, sampler, ["safety", "pairwise"], 0, 0, batch, None, moved)
    signal = bool((batch.samples[1] == 5).any()) and rewards[1].std() > 0
    assert signal and second["clipped"][0].item() > 0
    assert torch.equal(batch.old_log_probs, first_old)  # the sampling policy's, kept


def test_bad_input_exits_2_naming_the_flag(tmp_path, capsys):
    from megatron_sip.train_judge import main

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"task": "safety", "prefix": "P.", "text": "T.", "label": 1}\n')
    model = [
        "--device", "cpu", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "2", "--seq-length", "64", "--max-position-embeddings", "64",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--train-iters", "1",
    ]  # fmt: skip
    for flags, message in (
        ([], "--judge-train-data: required"),
        (["--judge-train-data", str(tasks), "--judge-prompt-dir", "qwen"], "qwen is a chat pack"),
        (["--judge-train-data", str(tasks), "--judge-prompt-dir", "nowhere"], "--judge-prompt-dir"),
        (["--judge-train-data", str(tmp_path / "none.jsonl")], "cannot read"),
        (["--judge-train-data", str(tasks), "--eval-iters", "2"], "no validation split"),
        (["--judge-train-data", str(tasks), "--grpo-group-size", "1"], "--grpo-group-size"),
    ):
        # Each is refused before any process group exists.
        with pytest.raises(SystemExit) as exit_info:
            main([*model, *flags])
        assert exit_info.value.code == 2, flags
        assert message in capsys.readouterr().err, flags
