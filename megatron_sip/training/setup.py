"""Model, optimizer and schedule for a training entry point (Megatron-LM's
``setup_model_and_optimizer``), from the parsed config groups, and the checkpoint they write."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig

from megatron_sip.data.config import TokenizerConfig, embedding_vocab_size
from megatron_sip.errors import ConfigError
from megatron_sip.initialize import DistributedContext, ParallelConfig
from megatron_sip.log import print_rank_0
from megatron_sip.models.checkpointing import (
    CheckpointConfig,
    find_checkpoint,
    load_checkpoint,
    model_metadata,
    read_tracker,
    resume_options,
    save_checkpoint,
)
from megatron_sip.models.config import ModelConfig
from megatron_sip.models.gpt import build_model
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.loop import TrainState
from megatron_sip.training.optimizer import build_optimizer
from megatron_sip.training.step import configure_schedule


@dataclasses.dataclass
class TrainingSetup:
    model_chunks: list
    transformer_config: TransformerConfig
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    vocab_size: int  # padded for tensor parallelism
    pg_collection: ProcessGroupCollection
    metadata: dict  # the model and tokenizer settings every checkpoint carries
    # Megatron-LM's `args` entry of every checkpoint (models.checkpointing.megatron_lm_args),
    # set by the entry point, which holds the parsed job config.
    checkpoint_args: Optional[argparse.Namespace] = None

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(
        self,
        checkpoint: CheckpointConfig,
        state: TrainState,
        *,
        extra: Optional[dict] = None,
        extra_modules: Optional[dict] = None,
    ) -> None:
        """Model, optimizer, schedule, RNG, the model/tokenizer settings, ``state`` and ``extra``
        (a trainer's own state) to ``--save`` (collective)."""
        for chunk in self.model_chunks:
            if chunk.ddp_config.overlap_param_gather:
                # With --overlap-param-gather the last step's all-gather of the updated
                # parameters waits for the next forward pass: finish it first (Megatron-LM's
                # force_param_sync before a save).
                chunk.start_param_sync(force_sync=True)
        args = argparse.Namespace(**vars(self.checkpoint_args or argparse.Namespace()))
        # Megatron-LM resumes its data position from these.
        args.iteration = state.iteration
        args.consumed_train_samples = state.consumed_train_samples
        save_checkpoint(
            checkpoint.save,
            state.iteration,
            self.model_chunks,
            self.optimizer,
            self.scheduler,
            args=args,
            save_optim=not checkpoint.no_save_optim,
            save_rng=not checkpoint.no_save_rng,
            extra_common={**self.metadata, **state.checkpoint_extra(), **(extra or {})},
            extra_modules=extra_modules,
        )


def setup_model_and_optimizer(
    model: ModelConfig,
    parallel: ParallelConfig,
    training: TrainingConfig,
    tokenizer: TokenizerConfig,
    tokenizer_vocab_size: int,
    context: DistributedContext,
    *,
    calculate_per_token_loss: bool = False,
) -> TrainingSetup:
    """DDP-wrapped model chunks, the Megatron optimizer and LR schedule, wired to the schedules.
    ``calculate_per_token_loss`` (or --calculate-per-token-loss): see
    :func:`megatron_sip.models.gpt.build_model`. Sets ``training.train_iters`` from
    --train-samples (as Megatron-LM's setup does)."""
    training.set_train_iters(context.data_parallel_size)
    vocab_size = embedding_vocab_size(
        tokenizer, tokenizer_vocab_size, parallel.tensor_model_parallel_size
    )
    chunks, transformer_config = build_model(
        model,
        parallel,
        vocab_size,
        context.pg_collection,
        bf16=training.bf16,
        fp16=training.fp16,
        use_distributed_optimizer=training.use_distributed_optimizer,
        overlap_grad_reduce=training.overlap_grad_reduce,
        overlap_param_gather=training.overlap_param_gather,
        grad_reduce_in_bf16=training.grad_reduce_in_bf16,
        calculate_per_token_loss=calculate_per_token_loss or training.calculate_per_token_loss,
    )
    optimizer, scheduler = build_optimizer(training, chunks, context.data_parallel_size)
    configure_schedule(transformer_config, chunks, optimizer)
    return TrainingSetup(
        chunks,
        transformer_config,
        optimizer,
        scheduler,
        vocab_size,
        context.pg_collection,
        model_metadata(model, tokenizer),
    )


def resume(
    checkpoint: CheckpointConfig, job: TrainingSetup, extra_modules: Optional[dict] = None
) -> TrainState:
    """State to start from: --load's checkpoint (its weights only with --finetune), else the
    weights of --pretrained-checkpoint, else a fresh model. A --load that cannot be what was
    meant (see :func:`~megatron_sip.models.checkpointing.find_checkpoint`) is a ConfigError.
    ``extra_modules`` ({key: module} a trainer saves beside the model) are restored only when
    resuming (the state's iteration is then > 0)."""
    if find_checkpoint(checkpoint) is not None:
        source, finetune = checkpoint.load, checkpoint.finetune
    elif checkpoint.pretrained_checkpoint:
        if read_tracker(checkpoint.pretrained_checkpoint) is None:
            raise ConfigError(
                "--pretrained-checkpoint",
                f"no checkpoint in {checkpoint.pretrained_checkpoint} (no tracker file); "
                "fix the path",
            )
        source, finetune = checkpoint.pretrained_checkpoint, True
    else:
        if checkpoint.load:
            print_rank_0(f"no checkpoint in {checkpoint.load}: starting from scratch")
        return TrainState()
    options = resume_options(checkpoint) if source == checkpoint.load else {}
    if finetune:
        options.update(load_optim=False, load_rng=False)
    else:
        options.update(extra_modules=extra_modules)
    loaded = load_checkpoint(source, job.model_chunks, job.optimizer, job.scheduler, **options)
    if finetune:
        flag = "--finetune" if source == checkpoint.load else "--pretrained-checkpoint"
        print_rank_0(f"{flag}: weights from {loaded.path}, starting at iteration 0")
        return TrainState()
    print_rank_0(f"resuming from {loaded.path} at iteration {loaded.iteration}")
    if not loaded.optimizer_restored and not checkpoint.no_load_optim:
        print_rank_0(f"{loaded.path} holds no optimizer state: fresh optimizer and schedule")
    state = TrainState()
    state.restore(loaded.iteration, loaded.extra)
    return state
