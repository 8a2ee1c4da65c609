"""The EMA reference in bf16 training: an fp32 shadow fed by the optimizer's fp32 main weights
tracks the fp32 EMA formula (the bf16 in-place EMA barely moves), skipped optimizer steps move
nothing, and a checkpoint restores it exactly."""

from __future__ import annotations

import pytest
import torch

from megatron_sip.initialize import destroy_distributed

from . import workers
from .distributed import run_ranks

DECAY, UPDATES = 0.99, 300
DISTANCES = (0.01, 0.05, 0.2)  # the fixed target policy is this far from the start, in turn
BF16_ROUNDING = 2.0**-8  # bf16 keeps 8 significant bits: |round(x) - x| <= 2^-8 |x|


def _set_main_params(optimizer, params, values) -> None:
    """Puts ``values`` (fp32, one per model parameter) into the optimizer's main weights."""
    from megatron_sip.training.optimizer import fp32_main_params

    inner = optimizer.chained_optimizers[0]
    if hasattr(inner, "shard_fp32_from_float16_groups"):  # distributed: this rank's shards
        target = dict(zip(params, values))
        for model_group, shard_group in zip(
            inner.model_float16_groups, inner.shard_fp32_from_float16_groups
        ):
            for param, shard in zip(model_group, shard_group):
                span = inner._get_model_param_range_map(param)["param"]
                shard.copy_(target[param].view(-1)[span.start : span.end])
        return
    for main, value in zip(fp32_main_params(optimizer, params), values):
        main.copy_(value)


def _bf16_inplace_ema(start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The old update, in the parameters' dtype: what this test must tell apart."""
    reference, policy = start.to(torch.bfloat16), target.to(torch.bfloat16)
    for _ in range(UPDATES):
        reference.mul_(DECAY).add_(policy, alpha=1.0 - DECAY)
    return reference.double()


def ema_bf16_worker(root: str, distributed_optimizer: bool) -> None:
    from megatron_sip.models.checkpointing import load_checkpoint, save_checkpoint, unwrap_model
    from megatron_sip.models.gpt import build_gpt_model, transformer_config
    from megatron_sip.training.config import TrainingConfig
    from megatron_sip.training.optimizer import fp32_main_params
    from megatron_sip.training.sip.config import SIPConfig
    from megatron_sip.training.sip.reference import EMAReference

    parallel, context = workers.setup()
    training = TrainingConfig(
        micro_batch_size=workers.BATCH, lr=1e-3, train_iters=10, bf16=True,
        use_distributed_optimizer=distributed_optimizer,
    )  # fmt: skip
    chunks, _, optimizer, scheduler = workers.build_with_optimizer(parallel, context, training)
    params = list(unwrap_model(chunks[0]).parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)

    def reference_models():
        def model(bf16):
            config = transformer_config(workers.tiny_llama(), parallel, bf16=bf16)
            return build_gpt_model(
                workers.tiny_llama(), config, workers.VOCAB, context.pg_collection
            )

        return model(False), model(True)

    sip = SIPConfig(sip_ref_ema_decay=DECAY)
    shadow, view = reference_models()
    start = [m.detach().double().clone() for m in fp32_main_params(optimizer, params)]
    ema = EMAReference(shadow, view, chunks[0], optimizer, sip)
    targets = [(s * (1.0 + DISTANCES[i % len(DISTANCES)])).float() for i, s in enumerate(start)]
    _set_main_params(optimizer, params, targets)
    for iteration in range(1, UPDATES + 1):
        assert ema.maybe_update(iteration)
    # A skipped optimizer step moves no reference.
    before = [p.detach().clone() for p in shadow.parameters()]
    assert not ema.maybe_update(UPDATES + 1, update_successful=False)
    assert all(torch.equal(a, b) for a, b in zip(before, shadow.parameters()))

    kept = DECAY**UPDATES
    names = [name for name, _ in unwrap_model(chunks[0]).named_parameters()]
    shadows, views = dict(shadow.named_parameters()), dict(view.named_parameters())
    old_error = 0.0
    for name, s, t in zip(names, start, targets):
        exact = s * kept + t.double() * (1.0 - kept)
        scale = exact.abs() + 1e-30
        # The fp32 shadow: the formula up to fp32 accumulation (~1/(1-a) roundings).
        shadow_error = (shadows[name].double() - exact).abs()
        assert (shadow_error <= 1e-5 * scale).all(), name
        # The bf16 view the forward runs: the formula's result rounded once.
        view_error = (views[name].double() - exact).abs()
        assert (view_error <= BF16_ROUNDING * scale + 1e-5 * scale).all(), name
        covered = (shadows[name].double() - s).abs().sum() / (t.double() - s).abs().sum()
        assert covered.item() == pytest.approx(1.0 - kept, abs=1e-3), name
        old_error = max(old_error, ((_bf16_inplace_ema(s, t) - exact).abs() / scale).max().item())
    # The in-place bf16 EMA misses the same bound by far: small increments round away.
    assert old_error > 4 * BF16_ROUNDING, old_error

    # A checkpoint holds the fp32 shadow; resuming restores shadow and view exactly.
    save_checkpoint(root, UPDATES, chunks, extra_modules=ema.checkpoint_modules())
    restored_shadow, restored_view = reference_models()
    load_checkpoint(root, chunks, extra_modules={"reference": restored_shadow})
    restored = EMAReference(
        restored_shadow, restored_view, chunks[0], optimizer, sip, copy_policy=False
    )
    for ours, theirs in ((restored.shadow, shadow), (restored.module, view)):
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            assert a.dtype == b.dtype and torch.equal(a, b), name
    destroy_distributed()


@pytest.mark.slow
@pytest.mark.parametrize(
    "world,distributed_optimizer", [(1, False), (2, True)], ids=["float16-optimizer", "dp2-distopt"]
)
def test_bf16_ema_reference_tracks_the_fp32_formula(tmp_path, world, distributed_optimizer):
    run_ranks(ema_bf16_worker, world, str(tmp_path / "ckpt"), distributed_optimizer)
