"""CPU mode makes Megatron-Core's CUDA requests land on the CPU; deactivation undoes it."""

from __future__ import annotations

import contextlib

import pytest
import torch

from megatron_sip import platform
from megatron_sip.errors import ConfigError


def test_device_requests_land_on_cpu(cpu_platform):
    assert platform.active_device() == "cpu" and platform.distributed_backend() == "gloo"
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.ones(2).to(device="cuda:0").device.type == "cpu"
    assert not torch.empty(2, pin_memory=True).is_pinned()
    assert torch.ones(2).to(torch.float64).dtype == torch.float64  # other .to calls untouched


def test_megatron_rng_tracker_runs_on_the_cpu_generator(cpu_platform):
    from megatron.core.tensor_parallel.random import (
        get_cuda_rng_tracker,
        initialize_rng_tracker,
    )

    initialize_rng_tracker(force_reset=True)
    tracker = get_cuda_rng_tracker()
    tracker.add("model-parallel-rng", 77)
    torch.manual_seed(5)
    with tracker.fork("model-parallel-rng"):
        forked = torch.rand(4)
    after = torch.rand(4)
    torch.manual_seed(77)
    assert torch.equal(forked, torch.rand(4))  # the tracker's stream is seeded with its seed
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(4))  # and the default stream is left where it was
    initialize_rng_tracker(force_reset=True)


def test_clip_grad_on_cpu_scales_to_max_norm(cpu_platform):
    import megatron.core.optimizer.optimizer as megatron_optimizer

    assert megatron_optimizer.clip_grad_by_total_norm_fp32 is platform.clip_grad_by_total_norm_cpu
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0])
    total = torch.sqrt(sum((p.grad**2).sum() for p in params)).item()
    platform.clip_grad_by_total_norm_cpu(params, max_norm=1.0, total_norm=total)
    clipped = torch.sqrt(sum((p.grad**2).sum() for p in params)).item()
    assert clipped == pytest.approx(1.0, rel=1e-5)
    platform.clip_grad_by_total_norm_cpu(params, max_norm=10.0, total_norm=clipped)
    assert torch.sqrt(sum((p.grad**2).sum() for p in params)).item() == pytest.approx(1.0)


def test_deactivate_restores_torch():
    platform.activate("cpu")
    platform.deactivate()
    assert torch.cuda.current_device is not None
    with pytest.raises((RuntimeError, AssertionError)):
        torch.empty(1, device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="--device: cuda was requested but no GPU is visible"):
        platform.activate("cuda")
    assert platform.resolve_device("auto") == "cpu"


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_local_norm_supports_sequence_parallel_and_zero_centred_gamma(normalization, zero_centered):
    """The CPU platform's norm: torch's LayerNorm / RMSNorm with gamma stored as gamma - 1 under
    --apply-layernorm-1p, and weights marked for the tensor-parallel gradient all-reduce."""
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=2, normalization=normalization,
        layernorm_zero_centered_gamma=zero_centered, use_cpu_initialization=True,
        tensor_model_parallel_size=2, sequence_parallel=True,
    )  # fmt: skip
    norm = platform.LocalNorm(config, 8, eps=1e-6)
    reference = (torch.nn.LayerNorm if normalization == "LayerNorm" else torch.nn.RMSNorm)(
        8, eps=1e-6
    )
    assert norm.state_dict().keys() == reference.state_dict().keys()  # checkpoints unchanged
    assert all(p.sequence_parallel for p in norm.parameters())
    assert norm.weight.eq(0.0 if zero_centered else 1.0).all()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.5, 8))
        reference.weight.copy_(norm.weight + 1 if zero_centered else norm.weight)
        if norm.bias is not None:
            norm.bias.copy_(torch.linspace(0.1, 0.8, 8))
            reference.bias.copy_(norm.bias)
    hidden = torch.randn(3, 2, 8)
    torch.testing.assert_close(norm(hidden), reference(hidden))


def _angles(positions: int, dim: int) -> torch.Tensor:
    return torch.outer(
        torch.arange(float(positions)), 1.0 / 10000 ** (torch.arange(0, dim, 2) / dim)
    )


@pytest.mark.parametrize("interleaved", [False, True])
def test_cpu_rotary_kernel_equals_megatron_rope(cpu_platform, interleaved):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    x = torch.randn(3, 5, 4, 16, generator=torch.Generator().manual_seed(0))  # [b, s, h, d]
    angles = _angles(20, 12)  # rotary over the first 12 of 16 channels
    # Megatron's own layout of the angles: halves repeated, or each angle twice in a row.
    emb = angles.repeat_interleave(2, -1) if interleaved else torch.cat([angles, angles], -1)
    expected = _apply_rotary_pos_emb_bshd(
        x.transpose(0, 1), emb[3:8, None, None, :], rotary_interleaved=interleaved
    ).transpose(0, 1)
    actual = platform.apply_rotary_emb(x, angles.cos(), angles.sin(), interleaved, seqlen_offsets=3)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("new_tokens,causal", [(1, False), (3, True)])
def test_cpu_kv_cache_attention_rotates_caches_and_attends(cpu_platform, new_tokens, causal):
    generator = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, dim, offset, positions = 2, 4, 2, 8, 6, 12

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    memory = {name: torch.zeros(positions, batch, kv_heads, dim) for name in ("k", "v")}
    memory["k"][:offset], memory["v"][:offset] = (
        randn(offset, batch, kv_heads, dim),
        randn(offset, batch, kv_heads, dim),
    )
    old_keys, old_values = memory["k"][:offset].clone(), memory["v"][:offset].clone()
    q, k, v = (
        randn(batch, new_tokens, heads, dim),
        *(randn(batch, new_tokens, kv_heads, dim) for _ in range(2)),
    )
    angles = _angles(positions, dim)
    out = platform.kv_cache_attention(
        q, memory["k"].permute(1, 0, 2, 3), memory["v"].permute(1, 0, 2, 3), k, v,
        rotary_cos=angles.cos(), rotary_sin=angles.sin(),
        cache_seqlens=torch.full((batch,), offset, dtype=torch.int32),
        causal=causal, rotary_interleaved=False,
    )  # fmt: skip

    def rotate(x):
        return platform.apply_rotary_emb(x, angles.cos(), angles.sin(), seqlen_offsets=offset)

    rotated_q, rotated_k = rotate(q), rotate(k)
    end = offset + new_tokens
    # The new keys enter the cache rotated, the values as they are; the old entries stay.
    torch.testing.assert_close(memory["k"][offset:end], rotated_k.transpose(0, 1))
    torch.testing.assert_close(memory["v"][offset:end], v.transpose(0, 1))
    assert memory["k"][end:].eq(0).all() and torch.equal(memory["k"][:offset], old_keys)
    keys = torch.cat([old_keys, rotated_k.transpose(0, 1)])  # [end, b, kv heads, d]
    values = torch.cat([old_values, v.transpose(0, 1)])
    for b in range(batch):
        for h in range(heads):
            group = h // (heads // kv_heads)
            for i in range(new_tokens):
                seen = offset + i + 1 if causal else end
                scores = keys[:seen, b, group] @ rotated_q[b, i, h] / dim**0.5
                expected = torch.softmax(scores, 0) @ values[:seen, b, group]
                torch.testing.assert_close(out[b, i, h], expected)


def test_cpu_models_decode_with_flash_decode(cpu_platform):
    overrides = platform.model_config_overrides({"flash_decode": False})
    assert overrides["flash_decode"] is True
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import attention

    assert attention.flash_attn_with_kvcache is platform.kv_cache_attention
    assert rope_utils.apply_rotary_emb_flash is platform.apply_rotary_emb


@pytest.mark.parametrize("new_tokens,causal", [(1, False), (2, True)])
def test_cpu_kv_cache_attention_reads_a_shared_prefix_once(cpu_platform, new_tokens, causal):
    """Samples of a prefix share its cache rows below the declared length: the kernel reading
    them once per prefix gives what it gives reading every row's own copy."""
    generator = torch.Generator().manual_seed(2)
    prefixes, samples, heads, kv_heads, dim, shared, offset = 2, 3, 4, 2, 8, 5, 7
    batch, positions = prefixes * samples, 10
    keys, values = torch.randn(2, positions, batch, kv_heads, dim, generator=generator)
    # Positions below `shared` hold the same entries in every sample row of a prefix.
    for cache in (keys, values):
        cache[:shared] = cache[:shared, ::samples].repeat_interleave(samples, dim=1)
    q = torch.randn(batch, new_tokens, heads, dim, generator=generator)
    k, v = torch.randn(2, batch, new_tokens, kv_heads, dim, generator=generator)
    angles = _angles(positions, dim)
    outputs, caches = [], []
    for layout in (None, (prefixes, samples, shared)):
        memory = (keys.clone(), values.clone())
        kwargs = dict(
            rotary_cos=angles.cos(), rotary_sin=angles.sin(), causal=causal,
            cache_seqlens=torch.full((batch,), offset), rotary_interleaved=False,
        )  # fmt: skip
        with platform.shared_prefix_decoding(*layout) if layout else contextlib.nullcontext():
            outputs.append(
                platform.kv_cache_attention(
                    q, memory[0].permute(1, 0, 2, 3), memory[1].permute(1, 0, 2, 3), k, v,
                    **kwargs,
                )
            )  # fmt: skip
        caches.append(memory)
    torch.testing.assert_close(outputs[1], outputs[0])
    assert all(torch.equal(a, b) for a, b in zip(*caches))
    # With the layout the shared positions are read from each prefix's first row only.
    unread = [row for row in range(batch) if row % samples]
    poisoned = keys.clone(), values.clone()
    for cache in poisoned:
        cache[:shared, unread] = float("nan")
    with platform.shared_prefix_decoding(prefixes, samples, shared):
        out = platform.kv_cache_attention(
            q, poisoned[0].permute(1, 0, 2, 3), poisoned[1].permute(1, 0, 2, 3), k, v, **kwargs
        )
    torch.testing.assert_close(out, outputs[0])
    # A declared layout that does not match the batch is ignored (another caller's decode).
    with platform.shared_prefix_decoding(prefixes + 1, samples, shared):
        other = platform.kv_cache_attention(
            q, keys.clone().permute(1, 0, 2, 3), values.clone().permute(1, 0, 2, 3), k, v,
            **kwargs,
        )  # fmt: skip
    torch.testing.assert_close(other, outputs[0])
