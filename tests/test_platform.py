"""CPU mode makes Megatron-Core's CUDA requests land on the CPU; deactivation undoes it."""

from __future__ import annotations

import pytest
import torch

from megatron_sip import platform
from megatron_sip.errors import ConfigError


@pytest.fixture
def cpu_platform():
    platform.activate("cpu")
    try:
        yield
    finally:
        platform.deactivate()


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
