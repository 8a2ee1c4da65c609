"""The fused-linear log-prob op against the unfused one on materialised logits (and the naive
log_softmax + gather): values and gradients for hidden and weight, fp32 and bf16, chunk sizes
that do and do not divide the tokens, targets on other vocabulary shards, gradcheck, TP=2."""

from __future__ import annotations

import pytest
import torch

from megatron_sip.ops import dpo
from megatron_sip.ops.fused_linear import fused_linear_target_log_probs

from .distributed import run_ranks

KERNELS = [name for name in ("cpu", "cuda") if name != "cuda" or torch.cuda.is_available()]
IMPLEMENTATIONS = ["torch", *KERNELS]


def _device(name: str) -> str:
    return "cuda" if name == "cuda" else "cpu"


def _inputs(tokens=50, width=32, vocab=97, dtype=torch.float32, device="cpu", seed=0):
    """hidden [tokens, width], weight [vocab, width] scaled so logits spread over a few units,
    targets [tokens] in [0, vocab)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * (3.0 / width**0.5)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    return hidden.to(dtype).to(device), weight.to(dtype).to(device), targets.to(device)


def _loss_weights(tokens, device):
    """Per-token weights of the scalar the gradients are taken of (one zero: a token without
    gradient)."""
    weights = torch.linspace(-1.0, 2.0, tokens, device=device)
    weights[3] = 0.0
    return weights


def _values_and_grads(fn, hidden, weight):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    values = fn(hidden, weight)
    (values * _loss_weights(values.numel(), values.device).view(values.shape)).sum().backward()
    return values.detach(), hidden.grad, weight.grad


def _naive(hidden, weight, targets):
    logits = hidden.float() @ weight.float().t()
    return logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [7, 64])
def test_matches_the_unfused_op(implementation, dtype, chunk_size):
    """Same values and gradients as target_log_probs on the materialised logits; chunk 7 does
    not divide the 50 tokens (a short last chunk), 64 covers them in one."""
    device = _device(implementation)
    hidden, weight, targets = _inputs(dtype=dtype, device=device)

    ours = _values_and_grads(
        lambda h, w: fused_linear_target_log_probs(
            h, w, targets, chunk_size=chunk_size, implementation=implementation
        ),
        hidden,
        weight,
    )
    unfused = _values_and_grads(
        lambda h, w: dpo.target_log_probs(h @ w.t(), targets, implementation=implementation),
        hidden,
        weight,
    )
    tolerance = TOLERANCE[dtype]
    values, grad_hidden, grad_weight = ours
    assert values.dtype == torch.float32 and values.shape == targets.shape
    assert grad_hidden.dtype == dtype and grad_weight.dtype == dtype
    torch.testing.assert_close(values, unfused[0], atol=tolerance * 10, rtol=tolerance)
    for got, expected in zip(ours[1:], unfused[1:]):
        torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)
    assert torch.count_nonzero(grad_hidden[3]) == 0  # zero loss weight: no gradient


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_naive_computation(implementation, dtype):
    """Against log_softmax + gather in fp32 autograd on the (dtype-rounded) inputs."""
    device = _device(implementation)
    hidden, weight, targets = _inputs(dtype=dtype, device=device, seed=1)
    ours = _values_and_grads(
        lambda h, w: fused_linear_target_log_probs(
            h, w, targets, chunk_size=7, implementation=implementation
        ),
        hidden,
        weight,
    )
    naive = _values_and_grads(lambda h, w: _naive(h, w, targets), hidden.float(), weight.float())
    # bf16 rounds the logits (a few units: ~1e-2 absolute) before the softmax.
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    for got, expected in zip(ours, naive):
        torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_targets_on_another_shard(implementation):
    """This rank holds vocabulary [100, 197): targets inside get their logit, the others count
    as 0 (another rank adds theirs at TP > 1), as in the unfused op."""
    device = _device(implementation)
    hidden, weight, targets = _inputs(dtype=torch.float32, device=device, seed=2)
    targets = targets + 100
    targets[::3] = torch.tensor([5, 250, 99, 197], device=device).repeat(6)[: len(targets[::3])]
    inside = (targets >= 100) & (targets < 197)
    assert inside.any() and (~inside).any()

    ours = _values_and_grads(
        lambda h, w: fused_linear_target_log_probs(
            h, w, targets, vocab_start=100, chunk_size=7, implementation=implementation
        ),
        hidden,
        weight,
    )
    unfused = _values_and_grads(
        lambda h, w: dpo.target_log_probs(
            h @ w.t(), targets, vocab_start=100, implementation=implementation
        ),
        hidden,
        weight,
    )
    for got, expected in zip(ours, unfused):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Inside the shard: log-softmax over the shard, at the shifted index.
    local = _naive(hidden[inside], weight, (targets[inside] - 100))
    torch.testing.assert_close(ours[0][inside], local, atol=1e-5, rtol=1e-5)
    # Outside: 0 - lse of the shard.
    lse = (hidden[~inside] @ weight.t()).logsumexp(-1)
    torch.testing.assert_close(ours[0][~inside], -lse, atol=1e-5, rtol=1e-5)


def test_leading_dimensions_and_partial_gradients():
    """hidden [B, T, H] with targets [B, T]; only one input requiring grad; no grad at all."""
    hidden, weight, targets = _inputs(tokens=24, seed=3)
    hidden3, targets3 = hidden.view(4, 6, -1), targets.view(4, 6)
    full = _values_and_grads(
        lambda h, w: fused_linear_target_log_probs(h, w, targets, chunk_size=5), hidden, weight
    )

    leaf = hidden3.clone().requires_grad_()
    values = fused_linear_target_log_probs(leaf, weight, targets3, chunk_size=5)
    assert values.shape == (4, 6)
    (values * _loss_weights(24, "cpu").view(4, 6)).sum().backward()
    torch.testing.assert_close(values.detach().view(-1), full[0])
    torch.testing.assert_close(leaf.grad.view(24, -1), full[1])

    leaf = weight.clone().requires_grad_()
    values = fused_linear_target_log_probs(hidden, leaf, targets, chunk_size=5)
    (values * _loss_weights(24, "cpu")).sum().backward()
    torch.testing.assert_close(leaf.grad, full[2])

    with torch.no_grad():
        values = fused_linear_target_log_probs(hidden, weight, targets, chunk_size=5)
    torch.testing.assert_close(values, full[0])


def test_gradcheck_float64():
    hidden, weight, targets = _inputs(tokens=5, width=3, vocab=7, dtype=torch.float64, seed=4)
    assert torch.autograd.gradcheck(
        lambda h, w: fused_linear_target_log_probs(
            h, w, targets, chunk_size=2, implementation="torch"
        ),
        (hidden.requires_grad_(), weight.requires_grad_()),
    )


def test_rejects_bad_arguments():
    hidden, weight, targets = _inputs(tokens=4, width=8, vocab=10)
    with pytest.raises(ValueError, match="implementation"):
        fused_linear_target_log_probs(hidden, weight, targets, implementation="tpu")
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_target_log_probs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_target_log_probs(hidden, weight[:, :4], targets)
    with pytest.raises(ValueError, match="targets"):
        fused_linear_target_log_probs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_target_log_probs(hidden, weight.bfloat16(), targets)


def _tp2_worker(implementation: str, out: str) -> None:
    from megatron.core import parallel_state

    from .workers import setup

    setup(tp=2)
    rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    hidden, weight, targets = _inputs(tokens=30, vocab=200, seed=7)
    hidden = hidden.requires_grad_()  # replicated on both ranks
    shard = weight[rank * 100 : (rank + 1) * 100].clone().requires_grad_()
    values = fused_linear_target_log_probs(
        hidden,
        shard,
        targets,
        vocab_start=rank * 100,
        group=group,
        chunk_size=7,
        implementation=implementation,
    )
    (values * _loss_weights(30, "cpu")).sum().backward()
    torch.save(
        {"values": values.detach(), "grad_hidden": hidden.grad, "grad_weight": shard.grad},
        f"{out}.{rank}",
    )
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["torch", "cpu"])
def test_tp2_shards_match_the_full_vocabulary(implementation, tmp_path):
    """Two ranks, each with half of the vocabulary: the values and the (all-reduced) hidden
    gradient equal the full vocabulary's on both ranks; the weight shards' gradients concatenate
    to the full weight's."""
    out = str(tmp_path / "tp2")
    run_ranks(_tp2_worker, 2, implementation, out)
    hidden, weight, targets = _inputs(tokens=30, vocab=200, seed=7)
    expected = _values_and_grads(lambda h, w: _naive(h, w, targets), hidden, weight)
    parts = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for part in parts:
        torch.testing.assert_close(part["values"], expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(part["grad_hidden"], expected[1], atol=1e-5, rtol=1e-5)
    grad_weight = torch.cat([part["grad_weight"] for part in parts])
    torch.testing.assert_close(grad_weight, expected[2], atol=1e-5, rtol=1e-5)
