"""CPU mode makes Megatron-Core's CUDA requests land on the CPU; deactivation undoes it."""

from __future__ import annotations

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
