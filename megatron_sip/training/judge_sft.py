"""Supervised fine-tuning of a judge on its verdict tokens (the warm start before GRPO).

    python -m megatron_sip.training.judge_sft @examples/tiny_llama_cpu.args --eval-iters 0 \\
        --seq-length 384 --max-position-embeddings 384 \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model \\
        --judge-train-data data/demo/judge_train.jsonl --save judge_ckpt --train-iters 300

Each labelled judging task (``training/judge_data.py``) becomes the prompt the colocated judge will
see followed by its verdict token; the loss is the NLL of that one token. GRPO
(``megatron_sip.train_judge``) starts from this model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch

from megatron_sip.arguments import JobConfig, parse_args, reject_validation_flags
from megatron_sip.data.tokenizers import build_tokenizer
from megatron_sip.errors import ConfigError, exits_on_bad_input
from megatron_sip.initialize import destroy_distributed, initialize_distributed
from megatron_sip.log import print_rank_0, setup_logging
from megatron_sip.models.checkpointing import megatron_lm_args
from megatron_sip.platform import torch_device
from megatron_sip.roles.config import JudgePromptConfig
from megatron_sip.roles.prompts import load_pack
from megatron_sip.training.epochs import shuffled_groups
from megatron_sip.training.judge_data import (
    JudgeDataConfig,
    VerdictExample,
    training_examples,
    training_verdict_id,
)
from megatron_sip.training.loop import train
from megatron_sip.training.metrics import LoggingConfig, MetricWriter
from megatron_sip.training.next_token import next_token_trainer
from megatron_sip.training.setup import resume, setup_model_and_optimizer


@dataclasses.dataclass
class JudgeSFTJobConfig(JobConfig):
    """Every setting of a judge fine-tuning run."""

    judge_prompts: JudgePromptConfig
    judge_data: JudgeDataConfig
    logging: LoggingConfig

    def validate(self, world_size: int) -> None:
        super().validate(world_size)
        if not self.judge_data.judge_train_data:
            raise ConfigError("--judge-train-data", "required: the labelled judging tasks")
        reject_validation_flags(self.training, "judge SFT has no validation split")


def verdict_batches(
    examples: Sequence[VerdictExample],
    tokenizer,
    *,
    seq_length: int,
    micro_batch_size: int,
    seed: int,
    device=None,
    skip: int = 0,
) -> Iterator[dict]:
    """Endless micro-batches in a seeded order (after the first ``skip``, those a resumed run
    has trained on): each row is a prompt (cut on the left to fit) whose only loss position
    predicts the verdict token."""
    encoded = []
    for example in examples:
        verdict_id = training_verdict_id(tokenizer, example.verdict)
        prompt = tokenizer.tokenize(example.prompt)[-(seq_length - 1) :]
        encoded.append(prompt + [verdict_id])
    for rows in shuffled_groups(encoded, micro_batch_size, seed, skip):
        tokens = torch.zeros(micro_batch_size, seq_length, dtype=torch.long)
        labels = torch.zeros_like(tokens)
        loss_mask = torch.zeros(micro_batch_size, seq_length)
        for row, ids in enumerate(rows):
            ids = torch.as_tensor(ids)
            tokens[row, : len(ids) - 1] = ids[:-1]
            labels[row, : len(ids) - 1] = ids[1:]
            loss_mask[row, len(ids) - 2] = 1.0
        positions = torch.arange(seq_length).expand(micro_batch_size, -1)
        batch = {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": positions,
        }
        yield {k: v.to(device) if device is not None else v for k, v in batch.items()}


@exits_on_bad_input
def main(argv=None) -> None:
    config = parse_args(argv, JudgeSFTJobConfig, description=__doc__)
    prompt_settings, training = config.judge_prompts, config.training
    # The data is checked before any process group exists: bad input stops the run at once.
    tokenizer = build_tokenizer(config.tokenizer)
    examples = training_examples(
        config.judge_data,
        load_pack(prompt_settings.judge_prompt_dir, "--judge-prompt-dir"),
        prompt_settings.judge_max_prefix_chars,
        prompt_settings.judge_safety_window_sentences,
        seed=training.seed,
    )
    context = initialize_distributed(config.parallel, config.platform.device, training.seed)
    setup_logging()
    print_rank_0(f"judge SFT on {len(examples)} verdicts from {config.judge_data.judge_train_data}")
    job = setup_model_and_optimizer(
        config.model, config.parallel, training, config.tokenizer, tokenizer.vocab_size, context
    )
    job.checkpoint_args = megatron_lm_args(
        config, padded_vocab_size=job.vocab_size, world_size=context.world_size
    )
    state = resume(config.checkpoint, job)
    trainer = next_token_trainer(
        job,
        training,
        config.checkpoint,
        seq_length=config.model.seq_length,
        train_batches=verdict_batches(
            examples,
            tokenizer,
            seq_length=config.model.seq_length,
            micro_batch_size=training.micro_batch_size,
            seed=training.seed + context.data_parallel_rank,
            device=torch_device(),
            skip=state.iteration * training.num_microbatches(context.data_parallel_size),
        ),
    )
    writer = MetricWriter(config.logging)
    try:
        train(trainer, state, training, config.checkpoint, writer)
    finally:
        writer.close()
    destroy_distributed()


if __name__ == "__main__":
    main()
