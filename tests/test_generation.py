"""Rollouts: KV-cached shared-prefix generation at TP=1, TP=2 and PP=2."""

from __future__ import annotations

import pytest
import torch

from megatron_sip.inference import generation
from megatron_sip.inference.generation import generate, greedy_by_recompute
from megatron_sip.inference.sampling import SamplingConfig, sample, sampling_log_probs
from megatron_sip.initialize import destroy_distributed
from megatron_sip.models.checkpointing import load_checkpoint, save_checkpoint, unwrap_model

from . import workers
from .distributed import run_ranks

PREFIXES = [[5, 17, 42, 9, 33, 71, 2], [100, 3, 3, 8], [7, 7, 200, 1, 64]]  # lengths differ
NEW = 12


def _trained_weights(root: str) -> None:
    """Random weights with a few sharp preferences, so greedy decoding has no near-ties."""
    parallel, context = workers.setup()
    chunks, _ = workers.build(parallel, context)
    generator = torch.Generator().manual_seed(3)
    for param in chunks[0].parameters():
        param.data.add_(torch.randn(param.shape, generator=generator) * 0.05)
    save_checkpoint(root, 0, chunks)
    destroy_distributed()


def generation_worker(root: str, tp: int, pp: int, out: str) -> None:
    parallel, context = workers.setup(tp=tp, pp=pp)
    chunks, _ = workers.build(parallel, context)
    load_checkpoint(root, chunks)
    greedy = SamplingConfig(sip_temperature=0.0)
    # On the CPU decoding takes Megatron-Core's flash-decode path with the platform's kernel.
    from megatron.core.transformer import attention

    kernel, calls = attention.flash_attn_with_kvcache, []
    attention.flash_attn_with_kvcache = lambda *a, **k: calls.append(1) or kernel(*a, **k)
    try:
        cached = generate(
            chunks[0], PREFIXES, num_samples=2, num_tokens=NEW, sampling=greedy, seed=0
        )
    finally:
        attention.flash_attn_with_kvcache = kernel
    layers = len(unwrap_model(chunks[0]).decoder.layers)
    assert len(calls) == layers * (
        max(len(p) for p in PREFIXES) + NEW - 1 - min(map(len, PREFIXES))
    )
    for i, prefix in enumerate(PREFIXES):
        expected = greedy_by_recompute(chunks[0], prefix, NEW)
        for k in range(2):
            assert cached.tokens[i, k].tolist() == expected, (i, k)

    # Stop tokens end a row as EOD does (kept, mask 1), and decoding ends once every row has:
    # here each row's third greedy token is a stop token, so no row runs past it.
    stops = {int(t) for t in cached.tokens[:, 0, 2]}
    forwards = []
    forward = generation.pipeline_forward
    generation.pipeline_forward = lambda *a, **k: forwards.append(1) or forward(*a, **k)
    try:
        stopped = generate(
            chunks[0], PREFIXES, num_samples=2, num_tokens=NEW, sampling=greedy, seed=0,
            stop=sorted(stops),
        )  # fmt: skip
    finally:
        generation.pipeline_forward = forward
    for i in range(len(PREFIXES)):
        for k in range(2):
            full = cached.tokens[i, k].tolist()
            cut = next(j for j, token in enumerate(full) if token in stops) + 1
            assert cut <= 3
            assert stopped.tokens[i, k, :cut].tolist() == full[:cut]
            assert stopped.mask[i, k].tolist() == [1.0] * cut + [0.0] * (NEW - cut)
    lengths = [len(p) for p in PREFIXES]
    # One prefill, then one decoding step per position until the last row's third token.
    assert len(forwards) <= 1 + max(lengths) + 2 - min(lengths) < max(lengths) + NEW - min(lengths)

    def draw(seed, eod=None):
        return generate(
            chunks[0], PREFIXES, num_samples=4, num_tokens=NEW,
            sampling=SamplingConfig(sip_temperature=1.0), seed=seed, eod=eod,
        )  # fmt: skip

    # An EOD id that certainly occurs mid-rollout: the third token of the first rollout.
    eod = int(draw(11).tokens[0, 0, 2])
    sampled = [draw(11, eod), draw(11, eod), draw(12, eod)]
    assert torch.equal(sampled[0].tokens, sampled[1].tokens)
    assert not torch.equal(sampled[0].tokens, sampled[2].tokens)
    # K samples of one prefix differ from each other (they share the cache, not the draws).
    assert len({tuple(t.tolist()) for t in sampled[0].tokens[0]}) > 1
    # Tokens after the first EOD carry mask 0 and count nowhere.
    for rollouts in sampled:
        for row_tokens, row_mask in zip(rollouts.tokens.view(-1, NEW), rollouts.mask.view(-1, NEW)):
            eods = (row_tokens == eod).nonzero()
            cut = int(eods[0]) + 1 if len(eods) else NEW
            assert row_mask[:cut].eq(1).all() and row_mask[cut:].eq(0).all()
        masked = (rollouts.log_probs * rollouts.mask).sum(-1)
        torch.testing.assert_close(rollouts.sequence_log_probs(), masked)
        for rows, row_mask in zip(rollouts.as_candidates(), rollouts.mask):
            assert [len(r) for r in rows] == row_mask.sum(-1).long().tolist()
    assert any((r.mask == 0).any() for r in sampled), "no EOD drawn: the check saw nothing"
    if context.rank == 0:
        torch.save({"greedy": cached.tokens, "sampled": sampled[0].tokens}, out)
    destroy_distributed()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    run_ranks(_trained_weights, 1, str(root / "ckpt"))
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "world,tp,pp", [(1, 1, 1), (2, 2, 1), (2, 1, 2)], ids=["tp1", "tp2", "pp2"]
)
def test_cached_generation(weights, world, tp, pp):
    out = weights / f"rollouts_{tp}_{pp}.pt"
    run_ranks(generation_worker, world, str(weights / "ckpt"), tp, pp, str(out))
    reference = weights / "rollouts_1_1.pt"
    if reference.exists() and out != reference:
        # The same seed gives the same rollouts at any TP/PP size.
        expected, actual = torch.load(reference), torch.load(out)
        assert torch.equal(expected["greedy"], actual["greedy"])
        assert torch.equal(expected["sampled"], actual["sampled"])


def test_temperature_zero_is_greedy_and_full_sampling_matches_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    generator = torch.Generator().manual_seed(0)
    tokens, log_probs = sample(logits, SamplingConfig(sip_temperature=0.0), generator)
    assert tokens.item() == 0 and log_probs.item() == 0.0
    cold, _ = sample(logits.repeat(50, 1), SamplingConfig(sip_temperature=1e-4), generator)
    assert cold.eq(0).all()
    draws = 20000
    tokens, _ = sample(logits.repeat(draws, 1), SamplingConfig(), generator)
    observed = torch.bincount(tokens, minlength=6).float()
    expected = torch.softmax(logits[0], -1) * draws
    chi_square = ((observed - expected) ** 2 / expected).sum().item()
    assert chi_square < 20.5  # 5 degrees of freedom, p = 0.001


def test_top_k_and_top_p_truncate():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    top_k = sampling_log_probs(logits, SamplingConfig(sip_top_k=2)).exp()
    assert top_k[0, 2:].eq(0).all() and top_k.sum().item() == pytest.approx(1.0)
    probs = torch.softmax(logits[0], -1)  # 0.64, 0.24, 0.09, 0.03
    top_p = sampling_log_probs(logits, SamplingConfig(sip_top_p=0.8)).exp()[0]
    assert top_p[:2].gt(0).all() and top_p[2:].eq(0).all()
    torch.testing.assert_close(top_p[:2], probs[:2] / probs[:2].sum())
    padded = sampling_log_probs(logits, SamplingConfig(), vocab_size=3).exp()[0]
    assert padded[3] == 0


def test_draw_is_exact_across_vocabulary_blocks_and_skips_zero_probabilities():
    from megatron_sip.inference import sampling

    vocab = 3 * sampling.BLOCK + 17  # the last block is padded
    support = [0, 5, sampling.BLOCK - 1, sampling.BLOCK, 300, 2 * sampling.BLOCK + 1, vocab - 1]
    weights = torch.arange(1.0, len(support) + 1)
    logits = torch.full((vocab,), float("-inf"))
    logits[support] = weights.log()
    draws = 30000
    log_probs = torch.log_softmax(logits, -1).repeat(draws, 1)
    tokens = sampling.draw(log_probs, torch.Generator().manual_seed(0))
    assert set(tokens.unique().tolist()) <= set(support)
    observed = torch.bincount(tokens, minlength=vocab)[support].float()
    expected = weights / weights.sum() * draws
    chi_square = ((observed - expected) ** 2 / expected).sum().item()
    assert chi_square < 22.5  # 6 degrees of freedom, p = 0.001
    again = sampling.draw(log_probs[:100], torch.Generator().manual_seed(0))
    assert torch.equal(again, tokens[:100])
