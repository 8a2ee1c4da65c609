"""Next-token training for the generic loop: the step, validation and console line that
pretraining and judge SFT share (the loss is ``lm_loss.lm_forward_step``'s)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Optional

from megatron_sip.models.checkpointing import CheckpointConfig
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.lm_loss import lm_forward_step
from megatron_sip.training.loop import StepOutput, Trainer, TrainState, describe_losses
from megatron_sip.training.metrics import flops_per_sample
from megatron_sip.training.setup import TrainingSetup
from megatron_sip.training.step import broadcast_from_last_stage, forward_backward, train_step


def next_token_trainer(
    job: TrainingSetup,
    training: TrainingConfig,
    checkpoint: CheckpointConfig,
    *,
    seq_length: int,
    train_batches: Iterator[dict],
    valid_batches: Optional[Callable[[], Iterator[dict]]] = None,
) -> Trainer:
    """The loop's view of a next-token trainer: ``train_batches`` yields this rank's
    micro-batches; ``valid_batches`` makes a fresh validation iterator per evaluation. Its step
    metrics carry Megatron-LM's tag names (``lm loss``, ``grad-norm``, ``loss-scale``)."""
    data_parallel = job.pg_collection.dp.size()
    global_batch = training.global_batch(data_parallel)
    num_microbatches = training.num_microbatches(data_parallel)

    def step(state: TrainState) -> StepOutput:
        start = time.perf_counter()
        result = train_step(
            lm_forward_step,
            train_batches,
            job.model_chunks,
            job.optimizer,
            job.scheduler,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=training.micro_batch_size,
            samples_per_step=global_batch,
        )
        seconds = time.perf_counter() - start
        metrics = dict(result.losses)
        if result.grad_norm is not None:
            metrics["grad-norm"] = result.grad_norm
        metrics["loss-scale"] = job.optimizer.get_loss_scale().item()
        metrics["train/tokens-per-second"] = global_batch * seq_length / seconds
        return StepOutput(metrics, result.update_successful)

    def evaluate() -> dict[str, float]:
        for chunk in job.model_chunks:
            chunk.eval()
        batches, reports = valid_batches(), []
        for _ in range(training.eval_iters):
            reports += forward_backward(
                lm_forward_step,
                batches,
                job.model_chunks,
                num_microbatches=num_microbatches,
                seq_length=seq_length,
                micro_batch_size=training.micro_batch_size,
                forward_only=True,
            )
        for chunk in job.model_chunks:
            chunk.train()
        return broadcast_from_last_stage(reports, job.model_chunks)

    return Trainer(
        step=step,
        save=partial(job.save, checkpoint),
        learning_rate=job.learning_rate,
        samples_per_step=global_batch,
        evaluate=evaluate if valid_batches is not None else None,
        describe=describe_losses,
        model_chunks=job.model_chunks,
        flops_per_step=global_batch
        * flops_per_sample(job.transformer_config, seq_length, job.vocab_size),
    )
