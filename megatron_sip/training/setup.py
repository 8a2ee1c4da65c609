"""Model, optimizer and schedule for a training entry point (Megatron-LM's
``setup_model_and_optimizer``), from the parsed config groups."""

from __future__ import annotations

import dataclasses

from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig

from megatron_sip.data.config import TokenizerConfig, padded_vocab_size
from megatron_sip.initialize import DistributedContext, ParallelConfig
from megatron_sip.models.config import ModelConfig
from megatron_sip.models.gpt import build_model
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.optimizer import build_optimizer
from megatron_sip.training.step import configure_schedule


@dataclasses.dataclass
class TrainingSetup:
    model_chunks: list
    transformer_config: TransformerConfig
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    vocab_size: int  # padded for tensor parallelism


def setup_model_and_optimizer(
    model: ModelConfig,
    parallel: ParallelConfig,
    training: TrainingConfig,
    tokenizer: TokenizerConfig,
    tokenizer_vocab_size: int,
    context: DistributedContext,
) -> TrainingSetup:
    """DDP-wrapped model chunks, the Megatron optimizer and LR schedule, wired to the schedules."""
    vocab_size = padded_vocab_size(
        tokenizer_vocab_size,
        tokenizer.make_vocab_size_divisible_by,
        parallel.tensor_model_parallel_size,
    )
    chunks, transformer_config = build_model(
        model,
        parallel,
        vocab_size,
        bf16=training.bf16,
        use_distributed_optimizer=training.use_distributed_optimizer,
        pg_collection=context.pg_collection,
    )
    optimizer, scheduler = build_optimizer(training, chunks, context.data_parallel_size)
    configure_schedule(transformer_config, chunks, optimizer)
    return TrainingSetup(chunks, transformer_config, optimizer, scheduler, vocab_size)
