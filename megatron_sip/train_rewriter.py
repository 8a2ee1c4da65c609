"""Rewriter training: SFT on (prefix, original, rewrite) triples, then RL (--rewriter-rl).

    python -m megatron_sip.train_rewriter --device cpu --num-layers 4 --hidden-size 128 \\
        --ffn-hidden-size 352 --num-attention-heads 4 --seq-length 512 \\
        --max-position-embeddings 512 --normalization RMSNorm --swiglu \\
        --position-embedding-type rope --transformer-impl local \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model \\
        --rewriter-train-data data/demo/rewriter_sft.jsonl --micro-batch-size 8 \\
        --train-iters 300 --lr 3e-3 --save rewriter_ckpt

Each triple (``training/rewriter_data.py``) becomes the prompt the colocated rewriter will see
followed by its rewrite and the template's stop string (``</rewrite>``); the loss is the NLL of
those target tokens. The checkpoint is what ``--rewriter-backend megatron --rewriter-load
rewriter_ckpt`` loads. The tokenizer must write the stop string back (for SentencePiece: train
it with ``--user-defined-symbols '</rewrite>'``), else the rewriter could never end a rewrite and
the run stops at start-up.

With --rewriter-rl the same triples' (prefix, original) are the contexts of GRPO on sampled
rewrites, rewarded by the --judge-* judge (``training/rewriter_rl.py``, METHOD.md's rewards);
start it from the SFT rewriter with --pretrained-checkpoint.
"""

from __future__ import annotations

import dataclasses

from megatron_sip.arguments import (
    JobConfig,
    parse_args,
    reject_set_flags,
    reject_validation_flags,
)
from megatron_sip.data.tokenizers import build_tokenizer
from megatron_sip.errors import ConfigError, exits_on_bad_input
from megatron_sip.initialize import destroy_distributed, initialize_distributed
from megatron_sip.log import print_rank_0, setup_logging
from megatron_sip.models.checkpointing import megatron_lm_args
from megatron_sip.platform import torch_device
from megatron_sip.roles.config import (
    JudgeConfig,
    RewriterPromptConfig,
    RoleContext,
    build_judge,
)
from megatron_sip.roles.self_check import check_judge
from megatron_sip.training.grpo import GRPOConfig
from megatron_sip.training.loop import train
from megatron_sip.training.metrics import LoggingConfig, MetricWriter
from megatron_sip.training.next_token import next_token_trainer
from megatron_sip.training.rewriter_data import (
    RewriterDataConfig,
    encode_examples,
    read_triples,
    rewrite_batches,
    rewrite_examples,
    rewrite_template,
)
from megatron_sip.training.rewriter_rl import (
    RewriterRLConfig,
    prompt_batches,
    rewrite_prompts,
    rewriter_rl_trainer,
)
from megatron_sip.training.setup import resume, setup_model_and_optimizer


@dataclasses.dataclass
class RewriterTrainJobConfig(JobConfig):
    """Every setting of a rewriter training run (SFT, or RL with --rewriter-rl)."""

    rewriter_prompts: RewriterPromptConfig
    rewriter_data: RewriterDataConfig
    rewriter_rl: RewriterRLConfig
    grpo: GRPOConfig
    judge: JudgeConfig
    logging: LoggingConfig

    def validate(self, world_size: int) -> None:
        super().validate(world_size)
        if not self.rewriter_data.rewriter_train_data:
            raise ConfigError("--rewriter-train-data", "required: the rewriting triples")
        reject_validation_flags(self.training, "rewriter training has no validation split")
        if not self.rewriter_rl.rewriter_rl:
            reason = "rewriter SFT (without --rewriter-rl) samples and judges nothing"
            reject_set_flags(self.grpo, None, reason)
            reject_set_flags(self.judge, None, reason)
            reject_set_flags(self.rewriter_rl, None, reason)
        else:
            reject_set_flags(
                self.grpo, ["grpo_kl_coef"], "rewriter RL keeps no reference model to a KL"
            )


@exits_on_bad_input
def main(argv=None) -> None:
    config = parse_args(argv, RewriterTrainJobConfig, description=__doc__)
    training, seq_length = config.training, config.model.seq_length
    # The data is checked before any process group exists: bad input stops the run at once.
    tokenizer = build_tokenizer(config.tokenizer)
    template = rewrite_template(config.rewriter_prompts.rewriter_prompt_dir)
    triples = read_triples(config.rewriter_data.rewriter_train_data)
    examples = rewrite_examples(
        triples, template, config.rewriter_prompts.rewriter_max_prefix_chars
    )
    encoded = encode_examples(examples, tokenizer, seq_length)
    context = initialize_distributed(config.parallel, config.platform.device, training.seed)
    setup_logging()
    rl = config.rewriter_rl.rewriter_rl
    source = config.rewriter_data.rewriter_train_data
    print_rank_0(f"rewriter {'RL' if rl else 'SFT'} on {len(examples)} triples from {source}")
    job = setup_model_and_optimizer(
        config.model,
        config.parallel,
        training,
        config.tokenizer,
        tokenizer.vocab_size,
        context,
        calculate_per_token_loss=rl,
    )
    job.checkpoint_args = megatron_lm_args(
        config, padded_vocab_size=job.vocab_size, world_size=context.world_size
    )
    state = resume(config.checkpoint, job)
    skip = state.iteration * training.num_microbatches(context.data_parallel_size)
    judge = None
    if rl:
        judge = build_judge(config.judge, RoleContext(config.parallel, context.pg_collection))
        prompts = rewrite_prompts(
            examples,
            [(t.prefix, t.original) for t in triples],
            tokenizer,
            seq_length - config.rewriter_rl.rewriter_rl_max_tokens,
        )
        try:
            check_judge(judge, config.judge, context.pg_collection.mp)
        except BaseException:
            judge.close()
            raise
        trainer = rewriter_rl_trainer(
            job,
            config,
            judge,
            prompt_batches(
                prompts, training.micro_batch_size, training.seed + context.data_parallel_rank, skip
            ),
            tokenizer,
            template,
            seed=training.seed,
        )
    else:
        cut = sum(example.target_cut for example in encoded)
        if cut:
            print_rank_0(
                f"rewriter SFT: {cut} of {len(encoded)} targets are longer than --seq-length "
                f"{seq_length} and were cut on the right (they lose their stop string)"
            )
        trainer = next_token_trainer(
            job,
            training,
            config.checkpoint,
            seq_length=seq_length,
            train_batches=rewrite_batches(
                encoded,
                seq_length=seq_length,
                micro_batch_size=training.micro_batch_size,
                seed=training.seed + context.data_parallel_rank,
                device=torch_device(),
                skip=skip,
            ),
        )
    writer = MetricWriter(config.logging)
    try:
        train(trainer, state, training, config.checkpoint, writer)
    finally:
        writer.close()
        if judge is not None:
            judge.close()
    destroy_distributed()


if __name__ == "__main__":
    main()
