"""GRPO for the judge (METHOD.md, "Rewriter and judge training"), warm-started from judge SFT.

    torchrun --nproc-per-node 2 -m megatron_sip.train_judge @examples/tiny_llama_cpu.args \\
        --eval-iters 0 --seq-length 384 --max-position-embeddings 384 \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model \\
        --judge-train-data data/demo/judge_train.jsonl --pretrained-checkpoint judge_sft \\
        --save judge_grpo --train-iters 100

Each prompt is a labelled judging task rendered as the colocated judge sees it
(``training/judge_data.py``); the judge's generation is its verdict, one token at the answer
position. G verdicts are sampled per prompt (temperature and top-p from --grpo-*); a verdict
earns reward 1 when it is the label's, 0 when it is the other verdict or any other token (a parse
failure). Advantages are normalised within each prompt's group and the clipped objective of
``training/grpo.py`` is minimised, optionally with a KL penalty to the frozen start
(--grpo-kl-coef, the reference kept in the checkpoint). Runs at any TP/PP through Megatron's
schedules: the verdicts are sampled on the last stage from the TP-gathered answer logits with a
generator every TP rank seeds alike, so all ranks of a model replica draw the same ones.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Optional

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_sip.arguments import JobConfig, parse_args, reject_validation_flags
from megatron_sip.data.tokenizers import build_tokenizer
from megatron_sip.errors import ConfigError, exits_on_bad_input
from megatron_sip.inference.sampling import SamplingConfig, sampling_log_probs
from megatron_sip.initialize import destroy_distributed, initialize_distributed
from megatron_sip.log import print_rank_0, setup_logging
from megatron_sip.models.checkpointing import megatron_lm_args, unwrap_model
from megatron_sip.models.gpt import build_gpt_model, transformer_config
from megatron_sip.platform import torch_device
from megatron_sip.roles.config import JudgePromptConfig
from megatron_sip.roles.prompts import load_pack
from megatron_sip.training.epochs import shuffled_groups
from megatron_sip.training.grpo import GRPOConfig, group_advantages, grpo_loss
from megatron_sip.training.judge_data import (
    JudgeDataConfig,
    VerdictExample,
    training_examples,
    training_verdict_id,
)
from megatron_sip.training.loop import StepOutput, Trainer, TrainState, train
from megatron_sip.training.metrics import LoggingConfig, MetricWriter
from megatron_sip.training.setup import TrainingSetup, resume, setup_model_and_optimizer
from megatron_sip.training.step import forward_backward, train_step

REFERENCE_KEY = "reference"  # the frozen start's weights in a checkpoint (with --grpo-kl-coef)


@dataclasses.dataclass
class JudgeGRPOJobConfig(JobConfig):
    """Every setting of a judge GRPO run."""

    judge_prompts: JudgePromptConfig
    judge_data: JudgeDataConfig
    grpo: GRPOConfig
    logging: LoggingConfig

    def validate(self, world_size: int) -> None:
        super().validate(world_size)
        if not self.judge_data.judge_train_data:
            raise ConfigError("--judge-train-data", "required: the labelled judging tasks")
        reject_validation_flags(self.training, "judge GRPO has no validation split")


@dataclasses.dataclass
class VerdictMicroBatch:
    """Prompts ending at their answer position, right-padded to the sequence length."""

    tokens: torch.Tensor  # [P, S]
    position_ids: torch.Tensor  # [P, S]
    answer_at: torch.Tensor  # [P] index of each prompt's last token
    target: torch.Tensor  # [P] the correct verdict's token id
    options: torch.Tensor  # [P, 2] the template's two verdict token ids
    task: torch.Tensor  # [P] index into the run's task names
    # Set on the last stage by the first update of a batch, reused by the others:
    samples: Optional[torch.Tensor] = None  # [P, G] sampled verdict ids
    old_log_probs: Optional[torch.Tensor] = None  # [P, G] under the sampling policy
    reference_log_probs: Optional[torch.Tensor] = None  # [P, V] under the frozen start


def verdict_micro_batches(
    examples: Sequence[VerdictExample],
    tokenizer,
    tasks: Sequence[str],
    *,
    seq_length: int,
    micro_batch_size: int,
    seed: int,
    device=None,
    skip: int = 0,
) -> Iterator[VerdictMicroBatch]:
    """Endless micro-batches of prompts in a seeded order (the first ``skip`` are those a
    resumed run has trained on); prompts are cut on the left to the sequence length."""
    encoded = []
    for example in examples:
        prompt = tokenizer.tokenize(example.prompt)[-seq_length:]
        options = [training_verdict_id(tokenizer, verdict) for verdict in example.verdicts]
        target = options[example.verdicts.index(example.verdict)]
        encoded.append((prompt, target, options, tasks.index(example.task)))
    for rows in shuffled_groups(encoded, micro_batch_size, seed, skip):
        tokens = torch.zeros(micro_batch_size, seq_length, dtype=torch.long)
        for row, (prompt, *_) in enumerate(rows):
            tokens[row, : len(prompt)] = torch.as_tensor(prompt)
        yield VerdictMicroBatch(
            tokens=tokens.to(device),
            position_ids=torch.arange(seq_length).expand(micro_batch_size, -1).to(device),
            answer_at=torch.tensor([len(r[0]) - 1 for r in rows], device=device),
            target=torch.tensor([r[1] for r in rows], device=device),
            options=torch.tensor([r[2] for r in rows], device=device),
            task=torch.tensor([r[3] for r in rows], device=device),
        )


def answer_logits(logits: torch.Tensor, batch: VerdictMicroBatch, tp_group) -> torch.Tensor:
    """``[P, S, V/TP]`` vocab-parallel logits -> the full-vocabulary logits ``[P, V]`` at each
    prompt's answer position (differentiable; gathered over the TP group)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    local = logits[rows, batch.answer_at]
    if tp_group is not None and tp_group.size() > 1:
        local = gather_from_tensor_model_parallel_region(local, tp_group)
    return local.float()


@dataclasses.dataclass
class VerdictSampler:
    """Draws a batch's G verdicts per prompt: the same on every TP rank of a replica (same
    logits, same seed), different across data-parallel ranks and steps."""

    grpo: GRPOConfig
    vocab_size: int  # the tokenizer's (padding ids are never drawn)
    seed: int

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The policy's log-probs of verdicts, at the sampling temperature (no top-p: the
        objective's probabilities are the policy's own)."""
        config = SamplingConfig(sip_temperature=self.grpo.grpo_temperature)
        return sampling_log_probs(logits, config, self.vocab_size)

    def sample(self, logits: torch.Tensor, iteration: int, index: int) -> torch.Tensor:
        config = SamplingConfig(
            sip_temperature=self.grpo.grpo_temperature, sip_top_p=self.grpo.grpo_top_p
        )
        probs = sampling_log_probs(logits.detach(), config, self.vocab_size).exp()
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(hash((self.seed, iteration, index)) % (2**63))
        return torch.multinomial(probs, self.grpo.grpo_group_size, True, generator=generator)


def grpo_reports(
    batch: VerdictMicroBatch, logits: torch.Tensor, rewards: torch.Tensor, tasks: Sequence[str]
) -> dict[str, torch.Tensor]:
    """``{name: [sum, count]}`` of a micro-batch: mean reward, parse failures and group reward
    spread, and by task the sampled verdicts' reward and the greedy verdict's accuracy (the
    likelier of the two verdicts). Every name is in every report, so data-parallel ranks reduce
    the same list."""
    samples = batch.samples
    generations = float(samples.numel())
    parsed = (samples.unsqueeze(-1) == batch.options.unsqueeze(1)).any(-1)
    spread = rewards.std(dim=1, unbiased=False)
    pair = logits.detach().gather(1, batch.options)
    greedy = batch.options.gather(1, pair.argmax(dim=1, keepdim=True)).squeeze(1)
    correct = (greedy == batch.target).double()
    reports = {
        "reward": torch.stack([rewards.sum().double(), torch.tensor(generations).double()]),
        "parse failures": torch.stack([(~parsed).sum().double(), torch.tensor(generations)]),
        "reward spread": torch.stack([spread.sum().double(), torch.tensor(float(len(spread)))]),
    }
    for index, task in enumerate(tasks):
        mine = batch.task == index
        count = mine.sum().double()
        reports[f"reward/{task}"] = torch.stack(
            [rewards[mine].sum().double(), count * samples.shape[1]]
        )
        reports[f"accuracy/{task}"] = torch.stack([correct[mine].sum(), count])
    return {name: value.to(logits.device) for name, value in reports.items()}


def grpo_loss_func(
    grpo: GRPOConfig,
    sampler: VerdictSampler,
    tasks: Sequence[str],
    iteration: int,
    index: int,
    batch: VerdictMicroBatch,
    tp_group,
    output: torch.Tensor,
):
    """``(loss sum over prompts, prompt count, reports)``: Megatron divides by the global prompt
    count, so the loss is the mean over prompts of their generations' mean objective."""
    logits = answer_logits(output, batch, tp_group)
    if batch.samples is None:  # the batch's first update: draw its verdicts
        batch.samples = sampler.sample(logits, iteration, index)
    log_probs = sampler.log_probs(logits).gather(1, batch.samples)  # [P, G]
    if batch.old_log_probs is None:
        batch.old_log_probs = log_probs.detach()
    rewards = (batch.samples == batch.target.unsqueeze(1)).double()
    advantages = group_advantages(rewards)
    reference = None
    if batch.reference_log_probs is not None:
        reference = batch.reference_log_probs.gather(1, batch.samples).reshape(-1, 1)
    result = grpo_loss(
        log_probs.reshape(-1, 1),
        batch.old_log_probs.reshape(-1, 1),
        advantages.reshape(-1).to(log_probs.device),
        torch.ones_like(log_probs.reshape(-1, 1)),
        grpo.grpo_clip_epsilon,
        reference_log_probs=reference,
        kl_coef=grpo.grpo_kl_coef,
    )
    prompts = log_probs.shape[0]
    total = result.loss * prompts
    reports = grpo_reports(batch, logits, rewards.to(logits.device), tasks)
    count = torch.tensor(float(prompts), device=logits.device, dtype=torch.double)
    generations = count * log_probs.shape[1]
    reports["grpo loss"] = torch.stack([total.detach().double(), count])
    reports["clipped"] = torch.stack([result.clipped_fraction.double() * generations, generations])
    if result.kl is not None:
        reports["kl"] = torch.stack([result.kl.double() * generations, generations])
    return total, torch.tensor(prompts, dtype=torch.int, device=logits.device), reports


def grpo_forward_step(loss_func, batches: list, data_iterator, model):
    batch = next(data_iterator)
    output = model(batch.tokens, batch.position_ids, None)
    tp_group = unwrap_model(model).pg_collection.tp
    index = next(i for i, candidate in enumerate(batches) if candidate is batch)
    return output, partial(loss_func, index, batch, tp_group)


def _reference_loss(batch: VerdictMicroBatch, tp_group, sampler, output: torch.Tensor):
    batch.reference_log_probs = sampler.log_probs(answer_logits(output, batch, tp_group))
    zero = torch.zeros((), dtype=torch.int, device=output.device)
    return torch.zeros((), device=output.device), zero, {}


def _reference_step(sampler, data_iterator, model):
    batch = next(data_iterator)
    output = model(batch.tokens, batch.position_ids, None)
    tp_group = unwrap_model(model).pg_collection.tp
    return output, partial(_reference_loss, batch, tp_group, sampler)


@torch.no_grad()
def attach_reference(reference, sampler, micro_batches: list, seq_length: int) -> None:
    """The frozen start's verdict log-probs for every micro-batch (forward-only schedule)."""
    forward_backward(
        partial(_reference_step, sampler),
        iter(micro_batches),
        [reference],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batches[0].tokens.shape[0],
        forward_only=True,
    )


def grpo_trainer(
    job: TrainingSetup,
    config: JudgeGRPOJobConfig,
    batches: Iterator[VerdictMicroBatch],
    sampler: VerdictSampler,
    tasks: Sequence[str],
    reference=None,
) -> Trainer:
    """The loop's view of judge GRPO: each step draws the global batch's verdicts and takes
    --grpo-updates-per-batch optimizer steps on them (the clip matters from the second)."""
    training, grpo = config.training, config.grpo
    data_parallel = job.pg_collection.dp.size()
    global_batch = training.global_batch(data_parallel)
    num_microbatches = training.num_microbatches(data_parallel)
    seq_length = config.model.seq_length

    def step(state: TrainState) -> StepOutput:
        start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(num_microbatches)]
        if reference is not None:
            attach_reference(reference, sampler, micro_batches, seq_length)
        loss_func = partial(grpo_loss_func, grpo, sampler, tasks, state.iteration)
        metrics, successful = {}, True
        for update in range(grpo.grpo_updates_per_batch):
            last = update == grpo.grpo_updates_per_batch - 1
            result = train_step(
                partial(grpo_forward_step, loss_func, micro_batches),
                iter(micro_batches),
                job.model_chunks,
                job.optimizer,
                job.scheduler,
                num_microbatches=num_microbatches,
                seq_length=seq_length,
                micro_batch_size=training.micro_batch_size,
                # The schedule advances once per batch: later updates reuse the batch.
                samples_per_step=global_batch if last else 0,
            )
            successful = successful and result.update_successful
            if update == 0:  # what the sampling policy did
                metrics = {f"grpo/{name}": value for name, value in result.losses.items()}
            metrics["grpo/clipped"] = result.losses.get("clipped", 0.0)
            if result.grad_norm is not None:
                metrics["grad-norm"] = result.grad_norm
        metrics["grpo/prompts-per-second"] = global_batch / (time.perf_counter() - start)
        return StepOutput(metrics, successful)

    def describe(metrics: dict[str, float]) -> list[str]:
        parts = [
            f"grpo loss {metrics['grpo/grpo loss']:.6E}",
            f"reward {metrics['grpo/reward']:.3f}",
        ]
        parts += [f"{t} acc {metrics[f'grpo/accuracy/{t}']:.3f}" for t in tasks]
        parts.append(f"parse failures {metrics['grpo/parse failures']:.3f}")
        if "grpo/kl" in metrics:
            parts.append(f"kl {metrics['grpo/kl']:.4f}")
        if "grad-norm" in metrics:
            parts.append(f"grad norm {metrics['grad-norm']:.4f}")
        return parts

    def save(state: TrainState) -> None:
        modules = {REFERENCE_KEY: reference} if reference is not None else None
        job.save(config.checkpoint, state, extra_modules=modules)

    return Trainer(
        step=step,
        save=save,
        learning_rate=job.learning_rate,
        samples_per_step=global_batch,
        describe=describe,
        model_chunks=job.model_chunks,
    )


def build_frozen_reference(config: JudgeGRPOJobConfig, job: TrainingSetup):
    """A model of the policy's architecture and shard, frozen: the KL penalty's reference."""
    layers = transformer_config(config.model, config.parallel, bf16=config.training.bf16)
    reference = build_gpt_model(config.model, layers, job.vocab_size, job.pg_collection)
    reference.eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference


@exits_on_bad_input
def main(argv=None) -> None:
    config = parse_args(argv, JudgeGRPOJobConfig, description=__doc__)
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
    tasks = config.judge_data.tasks()
    print_rank_0(
        f"judge GRPO on {len(examples)} prompts from {config.judge_data.judge_train_data}, "
        f"{config.grpo.grpo_group_size} verdicts each"
    )
    job = setup_model_and_optimizer(
        config.model,
        config.parallel,
        training,
        config.tokenizer,
        tokenizer.vocab_size,
        context,
        calculate_per_token_loss=True,
    )
    job.checkpoint_args = megatron_lm_args(
        config, padded_vocab_size=job.vocab_size, world_size=context.world_size
    )
    reference = None
    if config.grpo.grpo_kl_coef > 0:
        reference = build_frozen_reference(config, job)
    extra = {REFERENCE_KEY: reference} if reference is not None else None
    state = resume(config.checkpoint, job, extra_modules=extra)
    if reference is not None and state.iteration == 0:
        # A fresh run: the reference is the start (the SFT judge), kept so through resumes.
        reference.load_state_dict(unwrap_model(job.model_chunks[0]).state_dict())
    sampler = VerdictSampler(
        config.grpo, tokenizer.vocab_size, seed=training.seed * 1000 + context.data_parallel_rank
    )
    batches = verdict_micro_batches(
        examples,
        tokenizer,
        tasks,
        seq_length=config.model.seq_length,
        micro_batch_size=training.micro_batch_size,
        seed=training.seed + context.data_parallel_rank,
        device=torch_device(),
        skip=state.iteration * training.num_microbatches(context.data_parallel_size),
    )
    trainer = grpo_trainer(job, config, batches, sampler, tasks, reference)
    writer = MetricWriter(config.logging)
    try:
        train(trainer, state, training, config.checkpoint, writer)
    finally:
        writer.close()
    destroy_distributed()


if __name__ == "__main__":
    main()
