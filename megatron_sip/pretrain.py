"""Next-token pretraining on indexed datasets: the baseline SIP is compared against, and the way
to make the base model for continual SIP. Runs under torchrun and under srun.

    torchrun --nproc-per-node 2 -m megatron_sip.pretrain @examples/tiny_llama_cpu.args \\
        --tokenizer-type NullTokenizer --vocab-size 512 \\
        --tensor-model-parallel-size 2 --data-path data/corpus_text_document --split 90,10,0 \\
        --save ckpt --save-interval 100 --tensorboard-dir tb
"""

from __future__ import annotations

import dataclasses

from megatron_sip.arguments import JobConfig, parse_args
from megatron_sip.data.config import DataConfig
from megatron_sip.data.gpt_data import (
    batch_iterator,
    build_gpt_datasets,
    check_indexed_dataset,
    split_sample_counts,
)
from megatron_sip.data.tokenizers import build_tokenizer
from megatron_sip.errors import ConfigError, exits_on_bad_input
from megatron_sip.initialize import destroy_distributed, initialize_distributed
from megatron_sip.log import print_rank_0, setup_logging
from megatron_sip.models.checkpointing import megatron_lm_args
from megatron_sip.platform import torch_device
from megatron_sip.training.loop import train
from megatron_sip.training.metrics import LoggingConfig, MetricWriter
from megatron_sip.training.next_token import next_token_trainer
from megatron_sip.training.setup import resume, setup_model_and_optimizer


@dataclasses.dataclass
class PretrainConfig(JobConfig):
    """Every setting of a pretraining run."""

    data: DataConfig
    logging: LoggingConfig

    def validate(self, world_size: int) -> None:
        super().validate(world_size)
        if not self.data.data_path and not self.data.mock_data:
            raise ConfigError(
                "--data-path",
                "required (an indexed dataset prefix or weighted prefixes), or --mock-data",
            )
        if self.training.train_iters is None and self.training.train_samples is None:
            raise ConfigError("--train-iters", "give --train-iters or --train-samples")
        if self.data.data_path:
            # Before any model is built: a missing or damaged file is a flag error.
            for prefix in self.data.blend()[0]:
                check_indexed_dataset(prefix)


@exits_on_bad_input
def main(argv=None) -> None:
    config = parse_args(argv, PretrainConfig, description=__doc__)
    model_cfg, training, data = config.model, config.training, config.data
    context = initialize_distributed(config.parallel, config.platform.device, training.seed)
    setup_logging()
    context.announce()

    tokenizer = build_tokenizer(config.tokenizer)
    job = setup_model_and_optimizer(
        model_cfg, config.parallel, training, config.tokenizer, tokenizer.vocab_size, context
    )
    job.checkpoint_args = megatron_lm_args(
        config, padded_vocab_size=job.vocab_size, world_size=context.world_size
    )
    state = resume(config.checkpoint, job)

    global_batch = training.global_batch(context.data_parallel_size)
    datasets = build_gpt_datasets(
        data,
        tokenizer,
        seq_length=model_cfg.seq_length,
        seed=training.seed,
        num_samples=split_sample_counts(training.train_iters, training.eval_iters, global_batch),
    )
    if training.eval_iters and not datasets.valid:
        print_rank_0(
            f"no validation documents in --split {data.split}: no evaluation "
            f"(--eval-iters {training.eval_iters} has nothing to read)"
        )

    def batches(dataset, consumed):
        return batch_iterator(
            dataset,
            consumed_samples=consumed,
            micro_batch_size=training.micro_batch_size,
            data_parallel_rank=context.data_parallel_rank,
            data_parallel_size=context.data_parallel_size,
            num_workers=data.num_workers,
            device=torch_device(),
        )

    trainer = next_token_trainer(
        job,
        training,
        config.checkpoint,
        seq_length=model_cfg.seq_length,
        train_batches=batches(datasets.train, state.consumed_train_samples),
        valid_batches=(lambda: batches(datasets.valid, 0)) if datasets.valid else None,
    )
    writer = MetricWriter(config.logging, dataclasses.asdict(config))
    print_rank_0(
        f"pretraining: world {context.world_size} on {context.device}, "
        f"TP={config.parallel.tensor_model_parallel_size} "
        f"PP={config.parallel.pipeline_model_parallel_size} DP={context.data_parallel_size}, "
        f"global batch {global_batch}, from iteration {state.iteration} to {training.train_iters}"
    )
    try:
        train(trainer, state, training, config.checkpoint, writer)
    finally:
        writer.close()
    destroy_distributed()


if __name__ == "__main__":
    main()
