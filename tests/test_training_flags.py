"""Megatron-LM's training, schedule, precision and data flags, honoured through Megatron-Core:
the LR schedule against hand-computed values, fp16 loss scaling, per-token loss, decoupled LR,
overlapped gradient reduction and parameter gathering at DP=2, and damaged dataset files."""

from __future__ import annotations

import math
import os
import types

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_sip.data.gpt_data import check_indexed_dataset
from megatron_sip.errors import ConfigError
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.optimizer import scheduler_arguments

from .distributed import run_ranks

# --------------------------------------------------------------------------------------------
# learning-rate schedule (no model: Megatron-Core's scheduler over a stand-in optimizer)
# --------------------------------------------------------------------------------------------


def lr_after_steps(training: TrainingConfig, steps: int, data_parallel_size: int = 1) -> float:
    """The LR Megatron-Core's OptimizerParamScheduler sets after ``steps`` optimizer steps, built
    with the arguments ``build_optimizer`` gives it."""
    optimizer = types.SimpleNamespace(param_groups=[{}])
    scheduler = OptimizerParamScheduler(
        optimizer, **scheduler_arguments(training, data_parallel_size)
    )
    for _ in range(steps):
        scheduler.step(increment=training.global_batch(data_parallel_size))
    return optimizer.param_groups[0]["lr"]


def test_sample_based_cosine_schedule():
    training = TrainingConfig(
        micro_batch_size=2,
        global_batch_size=10,
        train_samples=1005,
        lr=1.0,
        min_lr=0.1,
        lr_decay_style="cosine",
        lr_warmup_samples=100,
        lr_decay_samples=800,
    )
    # Megatron-LM at a constant batch size: iterations = samples // global batch.
    assert training.set_train_iters(1) == 100
    assert lr_after_steps(training, 5) == pytest.approx(0.5)  # 50 of 100 warm-up samples
    assert lr_after_steps(training, 10) == pytest.approx(1.0)
    # 450 samples: (450 - 100) / (800 - 100) = half of the cosine decay.
    assert lr_after_steps(training, 45) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_after_steps(training, 90) == pytest.approx(0.1)  # past --lr-decay-samples


def test_wsd_schedule_in_iterations():
    training = TrainingConfig(
        micro_batch_size=1,
        global_batch_size=4,
        train_iters=100,
        lr=1.0,
        min_lr=0.0,
        lr_warmup_iters=10,
        lr_decay_style="WSD",
        lr_wsd_decay_style="linear",
        lr_wsd_decay_iters=20,
    )
    assert lr_after_steps(training, 5) == pytest.approx(0.5)
    assert lr_after_steps(training, 50) == pytest.approx(1.0)  # stable phase
    assert lr_after_steps(training, 80) == pytest.approx(1.0)  # annealing starts after 80
    assert lr_after_steps(training, 90) == pytest.approx(0.5)  # halfway through 20 steps


def test_warmup_fraction_and_init_and_exponential_wsd_samples():
    training = TrainingConfig(
        micro_batch_size=2,
        train_samples=100,
        lr=1.0,
        lr_warmup_fraction=0.1,  # of the 100 decay samples: 10
        lr_warmup_init=0.2,
        lr_decay_style="WSD",
        lr_wsd_decay_samples=40,
    )
    # Global batch 2 (no --global-batch-size, DP 1): 4 samples are 40% of the warm-up.
    assert lr_after_steps(training, 2) == pytest.approx(0.2 + 0.8 * 0.4)
    # 80 samples: 40 / 40 ... annealing from 60; exponential: 2 * 0.5**ratio - 1.
    assert lr_after_steps(training, 40) == pytest.approx(2 * 0.5 ** (20 / 40) - 1)


def test_train_samples_sets_iterations_from_data_parallel_global_batch():
    training = TrainingConfig(micro_batch_size=3, train_samples=100)
    assert training.set_train_iters(data_parallel_size=2) == 100 // 6
    with pytest.raises(ConfigError, match="--train-iters or --train-samples"):
        TrainingConfig().set_train_iters(1)
    with pytest.raises(ConfigError, match="less than one global batch"):
        TrainingConfig(micro_batch_size=4, train_samples=3).set_train_iters(1)


# --------------------------------------------------------------------------------------------
# one rank: fp16 loss scaling, per-token loss, decoupled LR
# --------------------------------------------------------------------------------------------


def _one_rank_checks():
    from megatron_sip.initialize import set_random_seed
    from megatron_sip.training.lm_loss import lm_forward_step
    from megatron_sip.training.optimizer import build_optimizer
    from megatron_sip.training.step import configure_schedule, forward_backward, train_step

    from . import workers

    parallel, context = workers.setup()

    def build(training: TrainingConfig, **kwargs):
        set_random_seed(1234, 0)  # the same initial weights for every build
        chunks, config = workers.build(
            parallel,
            context,
            fp16=training.fp16,
            **kwargs,
        )
        optimizer, scheduler = build_optimizer(training, chunks, 1)
        configure_schedule(config, chunks, optimizer)
        return chunks, optimizer, scheduler

    def step(chunks, optimizer, scheduler, batches, micro_batch_size):
        return train_step(
            lm_forward_step,
            iter(batches),
            chunks,
            optimizer,
            scheduler,
            num_microbatches=len(batches),
            seq_length=workers.SEQ,
            micro_batch_size=micro_batch_size,
            samples_per_step=len(batches) * micro_batch_size,
        )

    batch = workers.fixed_batch(seed=0)

    # fp16: half-precision weights; a 2**32 loss scale overflows fp16 gradients, so Megatron's
    # DynamicGradScaler skips the step and (hysteresis 1) halves the scale, LR schedule frozen.
    overflow = TrainingConfig(
        micro_batch_size=workers.BATCH, train_iters=4, lr=1e-2, fp16=True, hysteresis=1
    )
    chunks, optimizer, scheduler = build(overflow)
    assert {p.dtype for p in chunks[0].module.parameters()} == {torch.float16}
    before = [p.detach().clone() for p in chunks[0].parameters()]
    result = step(chunks, optimizer, scheduler, [batch], workers.BATCH)
    assert not result.update_successful
    assert optimizer.get_loss_scale().item() == 2.0**31
    assert scheduler.num_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, chunks[0].parameters()))

    # A workable loss scale: every step updates and the loss falls on the repeated batch.
    fitting = TrainingConfig(
        micro_batch_size=workers.BATCH,
        train_iters=4,
        lr=1e-2,
        fp16=True,
        initial_loss_scale=2.0**10,
    )
    chunks, optimizer, scheduler = build(fitting)
    losses = []
    for _ in range(3):
        result = step(chunks, optimizer, scheduler, [batch], workers.BATCH)
        assert result.update_successful and math.isfinite(result.grad_norm)
        losses.append(result.losses["lm loss"])
    assert losses[-1] < losses[0] - 0.1, losses
    assert optimizer.get_loss_scale().item() == 2.0**10

    # Per-token loss: two micro-batches with different token counts give the gradient of the
    # global token mean (one micro-batch holding both), not the mean of per-micro-batch means.
    first, second = workers.fixed_batch(seed=1), workers.fixed_batch(seed=2)
    second["loss_mask"][:, workers.SEQ // 4 :] = 0
    both = {key: torch.cat([first[key], second[key]]) for key in first}
    plain = TrainingConfig(micro_batch_size=workers.BATCH, train_iters=1, clip_grad=0.0)

    def grads(batches, calculate_per_token_loss):
        chunks, _, _ = build(plain, calculate_per_token_loss=calculate_per_token_loss)
        for chunk in chunks:
            chunk.zero_grad_buffer()
        forward_backward(
            lm_forward_step,
            iter(batches),
            chunks,
            num_microbatches=len(batches),
            seq_length=workers.SEQ,
            micro_batch_size=batches[0]["tokens"].shape[0],
        )
        return workers.named_grads(chunks)

    global_mean = grads([both], calculate_per_token_loss=False)
    per_token = grads([first, second], calculate_per_token_loss=True)
    per_micro_batch = grads([first, second], calculate_per_token_loss=False)
    for name, grad in global_mean.items():
        torch.testing.assert_close(per_token[name], grad, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(per_micro_batch["decoder.final_layernorm.weight"],
                              global_mean["decoder.final_layernorm.weight"])  # fmt: skip

    # --decoupled-lr / --decoupled-min-lr: Megatron-Core's parameter groups give the embedding
    # and output layer their own peak and minimum LR, scheduled alongside the rest.
    decoupled = TrainingConfig(
        micro_batch_size=workers.BATCH,
        train_iters=2,
        lr=1e-3,
        min_lr=1e-4,
        decoupled_lr=5e-3,
        decoupled_min_lr=5e-4,
        lr_decay_style="linear",
    )
    chunks, optimizer, scheduler = build(decoupled)
    scheduler.step(increment=2 * workers.BATCH)  # the end of the decay
    lr_by_peak = {
        group["max_lr"]: group["lr"] for group in optimizer.param_groups if group["params"]
    }
    assert lr_by_peak == {1e-3: pytest.approx(1e-4), 5e-3: pytest.approx(5e-4)}, lr_by_peak
    names = {id(p): n for n, p in workers.unwrap_model(chunks[0]).named_parameters()}
    decoupled_names = {
        names[id(p)]
        for group in optimizer.param_groups
        if group["max_lr"] == 5e-3
        for p in group["params"]
    }
    assert decoupled_names == {"embedding.word_embeddings.weight", "output_layer.weight"}


def test_fp16_per_token_loss_and_decoupled_lr_on_one_rank():
    run_ranks(_one_rank_checks, 1)


# --------------------------------------------------------------------------------------------
# DP=2: overlapped gradient reduction and parameter gathering over gloo
# --------------------------------------------------------------------------------------------


def _overlap_checks():
    from megatron_sip.initialize import set_random_seed
    from megatron_sip.training.lm_loss import lm_forward_step
    from megatron_sip.training.optimizer import build_optimizer
    from megatron_sip.training.step import configure_schedule, train_step

    from . import workers

    parallel, context = workers.setup()
    rank = torch.distributed.get_rank()

    def run(**flags):
        training = TrainingConfig(
            micro_batch_size=workers.BATCH,
            global_batch_size=4 * workers.BATCH,
            train_iters=3,
            lr=1e-2,
            clip_grad=1.0,
            **flags,
        )
        set_random_seed(1234, 0)
        chunks, config = workers.build(
            parallel,
            context,
            bf16=training.bf16,
            use_distributed_optimizer=training.use_distributed_optimizer,
            overlap_grad_reduce=training.overlap_grad_reduce,
            overlap_param_gather=training.overlap_param_gather,
            grad_reduce_in_bf16=training.grad_reduce_in_bf16,
        )
        optimizer, scheduler = build_optimizer(training, chunks, context.data_parallel_size)
        configure_schedule(config, chunks, optimizer)
        losses = []
        for iteration in range(3):
            batches = [workers.fixed_batch(seed=100 * iteration + 10 * rank + i) for i in range(2)]
            result = train_step(
                lm_forward_step,
                iter(batches),
                chunks,
                optimizer,
                scheduler,
                num_microbatches=2,
                seq_length=workers.SEQ,
                micro_batch_size=workers.BATCH,
                samples_per_step=training.global_batch(2),
            )
            assert result.update_successful
            losses.append(result.losses["lm loss"])
        return chunks, losses

    plain_chunks, plain = run()
    plain_params = workers.named_params(plain_chunks[0])
    _, overlapped = run(overlap_grad_reduce=True)
    assert overlapped == pytest.approx(plain, rel=1e-6), (overlapped, plain)

    chunks, gathered = run(
        use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True
    )
    assert gathered == pytest.approx(plain, rel=1e-5), (gathered, plain)
    # The last step's all-gather waits for the next forward: the weights are stale until it is
    # forced, as TrainingSetup.save does before writing a checkpoint (each rank's own shard is
    # current: the fp32 distributed optimizer updates it in place).
    stale = [
        key
        for key, value in workers.named_params(chunks[0]).items()
        if not torch.allclose(value, plain_params[key])
    ]
    assert stale
    chunks[0].start_param_sync(force_sync=True)
    for key, value in workers.named_params(chunks[0]).items():
        torch.testing.assert_close(value, plain_params[key], rtol=1e-5, atol=1e-6)

    # --grad-reduce-in-bf16: Megatron-Core's DDP keeps the gradient buffers in bf16 (fp32 by
    # default); bf16 training with them stays close to the fp32 run.
    assert plain_chunks[0].buffers[0].grad_dtype == torch.float32
    chunks, bf16_reduce = run(bf16=True, grad_reduce_in_bf16=True)
    assert chunks[0].buffers[0].grad_dtype == torch.bfloat16
    assert bf16_reduce == pytest.approx(plain, rel=2e-2)


def test_overlapped_grad_reduce_and_param_gather_match_plain_ddp():
    run_ranks(_overlap_checks, 2)


# --------------------------------------------------------------------------------------------
# damaged dataset files
# --------------------------------------------------------------------------------------------


def _write_dataset(prefix: str, documents=((1, 2, 3, 4), (5, 6, 7), (8, 9))) -> None:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    for document in documents:
        builder.add_item(torch.tensor(document, dtype=torch.int32))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def test_damaged_dataset_files_are_named(tmp_path):
    prefix = str(tmp_path / "corpus_text_document")
    _write_dataset(prefix)
    check_indexed_dataset(prefix)  # intact

    with pytest.raises(ConfigError) as error:
        check_indexed_dataset(str(tmp_path / "missing"))
    assert error.value.flag == "--data-path"
    assert str(tmp_path / "missing.idx") in str(error.value)

    idx = open(prefix + ".idx", "rb").read()
    for damaged, fragment in (
        (idx[:-5], "is truncated"),
        (idx[:20], "bad or truncated header"),
        (b"not an index at all, just some text" * 4, "not a Megatron indexed-dataset index"),
    ):
        with open(prefix + ".idx", "wb") as handle:
            handle.write(damaged)
        with pytest.raises(ConfigError, match=fragment) as error:
            check_indexed_dataset(prefix)
        assert prefix + ".idx" in str(error.value)
        assert "tools/preprocess_data.py" in str(error.value)

    with open(prefix + ".idx", "wb") as handle:
        handle.write(idx)
    os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 4)
    with pytest.raises(ConfigError, match="too short") as error:
        check_indexed_dataset(prefix)
    assert prefix + ".bin" in str(error.value)


def test_split_that_leaves_a_split_without_documents_is_refused(tmp_path):
    """Megatron-Core would loop forever building a split that got no document."""
    from megatron_sip.data.config import DataConfig
    from megatron_sip.data.gpt_data import build_gpt_datasets
    from megatron_sip.data.tokenizers import NullTokenizer

    prefix = str(tmp_path / "corpus_text_document")
    _write_dataset(prefix)  # 3 documents
    data = DataConfig(data_path=[prefix], split="949,50,1", data_cache_path=str(tmp_path))
    with pytest.raises(ConfigError, match="leaves the validation split") as error:
        build_gpt_datasets(data, NullTokenizer(15), seq_length=4, seed=1, num_samples=[4, 1, 1])
    assert error.value.flag == "--split" and prefix in str(error.value)
    # A share of 0 builds no split at all: fine.
    data = DataConfig(data_path=[prefix], split="2,1,0", data_cache_path=str(tmp_path))
    datasets = build_gpt_datasets(
        data, NullTokenizer(15), seq_length=2, seed=1, num_samples=[2, 1, 0]
    )
    assert len(datasets.train) >= 2 and datasets.test is None
