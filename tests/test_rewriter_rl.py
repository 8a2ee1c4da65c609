"""Rewriter RL (training/rewriter_rl.py): where a sampled rewrite ends, METHOD.md's rewards from a
judge, the training rows and the objective's gradient, on constructed inputs. The end-to-end run
from an SFT rewriter is in test_train_rewriter.py."""

from __future__ import annotations

import pytest
import torch

from megatron_sip.roles.base import Judge
from megatron_sip.roles.prompts import PromptSet
from megatron_sip.training.grpo import GRPOConfig
from megatron_sip.training.rewriter_rl import (
    RewritePrompt,
    judge_rewrites,
    rewrite_lengths,
    rewrite_loss_func,
    rewrite_micro_batch,
    rewrite_text,
)

from .test_train_rewriter import STOP, CharTokenizer


def test_a_rewrite_ends_with_its_stop_string_or_eod():
    tokenizer = CharTokenizer()
    rows = ["Calm.</rewrite>junk", "No stop here at all", "Short\0\0\0\0\0\0\0\0\0\0\0\0\0\0"]
    width = max(len(r) for r in rows)
    tokens = torch.tensor([[ord(c) for c in r.ljust(width, "\0")] for r in rows])
    # The generator's mask: 1 up to and including the first EOD (0 here).
    mask = torch.zeros_like(tokens)
    for i, r in enumerate(rows):
        end = r.find("\0")
        mask[i, : (end + 1 if end >= 0 else width)] = 1
    lengths, finished = rewrite_lengths(tokens, mask, tokenizer, STOP)
    assert lengths == [len("Calm.</rewrite>"), width, len("Short") + 1]
    assert finished == [True, False, True]
    template = PromptSet.load()["rewrite"]
    assert rewrite_text(tokens[0, : lengths[0]].tolist(), tokenizer, template, "x") == "Calm."
    assert rewrite_text(tokens[2].tolist(), tokenizer, template, "x") == "Short"


class TableJudge(Judge):
    """P(safe) by text, P(first better) by (first, second); None where absent."""

    def __init__(self, safe, better):
        self.safe, self.better, self.calls = safe, better, []

    def prefer(self, prefixes, firsts, seconds):
        return [self.better.get((a, b)) for a, b in zip(firsts, seconds)]

    def quality(self, prefixes, firsts, seconds):
        self.calls.append(("quality", list(firsts)))
        return self.prefer(prefixes, firsts, seconds)

    def safety(self, prefixes, texts):
        self.calls.append(("safety", list(texts)))
        return [self.safe.get(t) for t in texts]

    def factuality(self, prefixes, texts):
        raise AssertionError("the rewriter's reward reads no factuality")


def test_rewards_copy_on_safe_contexts_and_judge_unsafe_ones():
    prompts = [
        RewritePrompt([1], "P1.", "Fine text."),  # a safe context
        RewritePrompt([2], "P2.", "You idiots."),  # an unsafe one
    ]
    judge = TableJudge(
        safe={"Fine text.": 0.9, "You idiots.": 0.1, "Nice.": 0.8, "Rude.": 0.2},
        better={("Nice.", "You idiots."): 0.6, ("Rude.", "You idiots."): 0.3},
    )
    rewrites = [[" Fine text. ", "Fine text!"], ["Nice.", "Rude."]]
    judged = judge_rewrites(judge, prompts, rewrites)
    assert judged.rewards == [1.0, 0.0, pytest.approx(0.5 * (0.6 + 0.8)), pytest.approx(0.25)]
    assert judged.safe_context == [True, True, False, False]
    assert judged.copied == [True, False, False, False]
    assert judged.quality == [None, None, 0.6, 0.3] and judged.safety == [None, None, 0.8, 0.2]
    # J_safe of the originals, then J_qual and J_safe of the unsafe context's rewrites only.
    assert judge.calls == [
        ("safety", ["Fine text.", "You idiots."]),
        ("quality", ["Nice.", "Rude."]),
        ("safety", ["Nice.", "Rude."]),
    ]
    # A context whose original the judge cannot score has no reward.
    judge.safe.pop("Fine text.")
    assert judge_rewrites(judge, prompts[:1], rewrites[:1]).rewards == [None, None]


def test_rows_and_objective_train_the_rewrite_tokens_only():
    prompts = [RewritePrompt([5, 6, 7], "P.", "O."), RewritePrompt([8, 9], "P.", "O.")]
    generated = torch.tensor([[[11, 12, 13], [14, 15, 16]], [[17, 18, 19], [20, 21, 22]]])
    lengths = [2, 3, 1, 3]
    advantages = torch.tensor([[1.0, -1.0], [0.5, -0.5]])
    batch = rewrite_micro_batch(prompts, generated, lengths, advantages, seq_length=8)
    assert batch.tokens[0].tolist() == [5, 6, 7, 11, 0, 0, 0, 0]
    assert batch.labels[0].tolist() == [6, 7, 11, 12, 0, 0, 0, 0]
    assert batch.loss_mask[0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]  # predict 11 and 12
    assert batch.loss_mask[2].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]  # predict 17
    assert batch.loss_mask[3].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert batch.advantages.tolist() == [1.0, -1.0, 0.5, -0.5]

    grpo = GRPOConfig(grpo_group_size=2, grpo_temperature=0.5)
    logits = torch.randn(4, 8, 30, requires_grad=True)
    total, count, reports = rewrite_loss_func(grpo, batch, None, logits)
    assert count.item() == 4 and reports["clipped"][0].item() == 0.0
    # On-policy: the loss is -sum_rows A_r (ratio 1, token mean), its gradient the policy gradient
    # -sum_rows A_r mean_t grad log p_T(token).
    assert total.item() == pytest.approx(-float(advantages.sum()), abs=1e-6)
    total.backward()
    expected = torch.zeros_like(logits)
    log_probs = torch.log_softmax(logits.detach() / 0.5, dim=-1)
    for row in range(4):
        positions = batch.loss_mask[row].nonzero().flatten()
        for t in positions:
            onehot = torch.nn.functional.one_hot(batch.labels[row, t], 30).float()
            grad = (onehot - log_probs[row, t].exp()) / 0.5
            expected[row, t] = -batch.advantages[row] * grad / len(positions)
    assert torch.allclose(logits.grad, expected, atol=1e-5)
