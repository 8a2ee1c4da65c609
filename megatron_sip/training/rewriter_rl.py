"""Rewriter RL (METHOD.md, "Rewriter and judge training"): GRPO on sampled rewrites, rewarded by
a judge.

For each (prefix, original) of the training triples the rewriter samples G rewrites (the
prompt is the colocated rewriter's, ``training/rewriter_data.py``). Rewards follow
``roles/rewards.py``: a context is safe when J_safe(original) >= 0.5; there a rewrite earns 1
when it equals the original (copying is right), else 0; on an unsafe context it earns
1/2 (J_qual(rewrite, original | prefix) + J_safe(rewrite)). The judge is any backend (oracle,
colocated Megatron checkpoint on the rewriter's ranks and layout, remote server). Advantages are
normalised within each prompt's group and ``training/grpo.py``'s clipped objective is minimised
over the rewrite's tokens (up to and including its stop string, or all of them when it has
none), with log-probabilities at the sampling temperature.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Optional

import torch

from megatron_sip.errors import ConfigError
from megatron_sip.inference.generation import generate
from megatron_sip.inference.sampling import SamplingConfig
from megatron_sip.models.checkpointing import unwrap_model
from megatron_sip.ops.dpo import target_log_probs
from megatron_sip.platform import torch_device
from megatron_sip.roles.base import Judge, score_present
from megatron_sip.roles.prompts import Template, encode_prompt, stop_token_ids
from megatron_sip.roles.rewards import context_is_safe, rewriter_reward
from megatron_sip.training.epochs import shuffled_groups
from megatron_sip.training.grpo import GRPOConfig, group_advantages, grpo_loss
from megatron_sip.training.loop import StepOutput, Trainer, TrainState
from megatron_sip.training.rewriter_data import RewriteExample
from megatron_sip.training.step import train_step


@dataclasses.dataclass
class RewriterRLConfig:
    """Rewriter RL (flags --rewriter-rl-*; GRPO's own are --grpo-*)."""

    rewriter_rl: bool = False
    """Train with RL (GRPO on sampled rewrites, rewarded by the --judge-* judge) instead of SFT;
    start from the SFT rewriter with --pretrained-checkpoint."""

    rewriter_rl_max_tokens: int = 64
    """Most tokens a sampled rewrite may have (as --rewriter-max-tokens when it rewrites in
    SIP)."""

    rewriter_rl_max_missing_rewards: float = 0.1
    """Share of a step's rewards the judge may leave missing; above it the run saves and stops
    (a judge that does not judge trains nothing)."""

    def __post_init__(self):
        if self.rewriter_rl_max_tokens <= 0:
            raise ConfigError("--rewriter-rl-max-tokens", "must be positive")
        if not 0.0 <= self.rewriter_rl_max_missing_rewards <= 1.0:
            raise ConfigError("--rewriter-rl-max-missing-rewards", "must be in [0, 1]")


@dataclasses.dataclass
class RewritePrompt:
    """A context to rewrite: the rendered prompt's tokens and the texts the reward reads."""

    ids: list[int]
    prefix: str
    original: str


def rewrite_prompts(
    examples: Sequence[RewriteExample], originals: Sequence[tuple[str, str]], tokenizer, limit: int
) -> list[RewritePrompt]:
    """The prompts of ``examples`` (cut on the left to ``limit`` tokens, as the colocated
    rewriter cuts them) with their (prefix, original) texts."""
    return [
        RewritePrompt(encode_prompt(example.prompt, tokenizer)[-limit:], prefix, original)
        for example, (prefix, original) in zip(examples, originals)
    ]


def prompt_batches(
    prompts: Sequence[RewritePrompt], count: int, seed: int, skip: int = 0
) -> Iterator[list[RewritePrompt]]:
    """Endless groups of ``count`` prompts in a seeded order (the first ``skip`` groups are
    those a resumed run has used)."""
    if len(prompts) < count:
        raise ConfigError("--micro-batch-size", f"{count} is more than the {len(prompts)} prompts")
    return shuffled_groups(prompts, count, seed, skip)


def rewrite_lengths(
    tokens: torch.Tensor, mask: torch.Tensor, tokenizer, stop: str
) -> tuple[list[int], list[bool]]:
    """Per sampled row ``[N]``: how many of its tokens the rewrite is (up to and including the
    token that completes the stop string, else up to its first EOD, ``mask``, else all) and
    whether it ended (stop string or EOD) within them."""
    lengths, finished = [], []
    for row, row_mask in zip(tokens.tolist(), mask.tolist()):
        limit = int(sum(row_mask))
        length, ended = (
            limit,
            limit < len(row) or (tokenizer.eod is not None and row[limit - 1] == tokenizer.eod),
        )
        if stop and stop in tokenizer.detokenize(row[:limit]):
            length = next(n for n in range(1, limit + 1) if stop in tokenizer.detokenize(row[:n]))
            ended = True
        lengths.append(max(length, 1))
        finished.append(ended)
    return lengths, finished


def rewrite_text(tokens: Sequence[int], tokenizer, template: Template, original: str) -> str:
    """What the colocated rewriter returns for these generated tokens (``Template.rewrite_from``:
    cut at the stop string; the unchanged marker is ``original``)."""
    text = tokenizer.detokenize([t for t in tokens if t != tokenizer.eod])
    return template.rewrite_from(text, original)


@dataclasses.dataclass
class RewardColumns:
    """A step's rewards and what they were made of, one entry per rewrite."""

    rewards: list[Optional[float]]
    safe_context: list[Optional[bool]]
    copied: list[bool]
    quality: list[Optional[float]]  # J_qual(rewrite, original | prefix), unsafe contexts only
    safety: list[Optional[float]]  # J_safe(rewrite), unsafe contexts only


def judge_rewrites(
    judge: Judge, prompts: Sequence[RewritePrompt], rewrites: Sequence[Sequence[str]]
) -> RewardColumns:
    """Rewards of ``rewrites[p][g]`` (G per prompt), flattened prompt-major; the judge is asked
    J_safe of each original and, on unsafe contexts only, J_qual and J_safe of each rewrite."""
    groups = len(rewrites[0]) if rewrites else 0
    originals = judge.safety([p.prefix for p in prompts], [p.original for p in prompts])
    safe = [context_is_safe(score) for score in originals]
    flat = [(p, text, s) for p, texts, s in zip(prompts, rewrites, safe) for text in texts]
    asked = [i for i, (_, _, s) in enumerate(flat) if s is False]
    quality: list[Optional[float]] = [None] * len(flat)
    safety: list[Optional[float]] = [None] * len(flat)
    if asked:
        prefixes = [flat[i][0].prefix for i in asked]
        texts = [flat[i][1] for i in asked]
        scored_quality = judge.quality(prefixes, texts, [flat[i][0].original for i in asked])
        scored_safety = judge.safety(prefixes, texts)
        for i, q, s in zip(asked, scored_quality, scored_safety):
            quality[i], safety[i] = q, s
    rewards = [
        rewriter_reward(p.original, text, s, q, j)
        for (p, text, s), q, j in zip(flat, quality, safety)
    ]
    copied = [text.strip() == p.original.strip() for p, text, _ in flat]
    assert len(rewards) == len(prompts) * groups
    return RewardColumns(rewards, [s for _, _, s in flat], copied, quality, safety)


@dataclasses.dataclass
class RewriteMicroBatch:
    """Prompts with their sampled rewrites, one row per rewrite, right-padded."""

    tokens: torch.Tensor  # [R, S]
    labels: torch.Tensor  # [R, S]
    loss_mask: torch.Tensor  # [R, S] the positions that predict a rewrite token
    position_ids: torch.Tensor  # [R, S]
    advantages: torch.Tensor  # [R]
    old_log_probs: Optional[torch.Tensor] = None  # [R, S] set by the batch's first update


def rewrite_micro_batch(
    prompts: Sequence[RewritePrompt],
    generated: torch.Tensor,
    lengths: Sequence[int],
    advantages: torch.Tensor,
    seq_length: int,
    device=None,
) -> RewriteMicroBatch:
    """Rows ``prompt + rewrite`` (``generated [P, G, N]`` cut to ``lengths``, prompt-major)."""
    groups = generated.shape[1]
    rows = len(prompts) * groups
    tokens = torch.zeros(rows, seq_length, dtype=torch.long)
    labels = torch.zeros_like(tokens)
    loss_mask = torch.zeros(rows, seq_length)
    for row in range(rows):
        prompt = prompts[row // groups].ids
        rewrite = generated[row // groups, row % groups, : lengths[row]].tolist()
        ids = torch.as_tensor((prompt + rewrite)[: seq_length + 1])
        tokens[row, : len(ids) - 1] = ids[:-1]
        labels[row, : len(ids) - 1] = ids[1:]
        loss_mask[row, len(prompt) - 1 : len(ids) - 1] = 1.0
    positions = torch.arange(seq_length).expand(rows, -1)
    batch = RewriteMicroBatch(tokens, labels, loss_mask, positions, advantages.reshape(-1))
    for name in ("tokens", "labels", "loss_mask", "position_ids", "advantages"):
        setattr(batch, name, getattr(batch, name).to(device))
    return batch


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float, tp_group):
    """log p_T(label) per position from vocab-parallel logits ``[R, S, V/TP]``."""
    start = 0
    if tp_group is not None and tp_group.size() > 1:
        start = tp_group.rank() * logits.shape[-1]
    return target_log_probs(logits.float() / temperature, labels, vocab_start=start, group=tp_group)


def rewrite_loss_func(grpo: GRPOConfig, batch: RewriteMicroBatch, tp_group, output: torch.Tensor):
    """``(loss sum over rewrites, rewrite count, reports)``: Megatron divides by the global
    rewrite count, so the loss is the mean over rewrites of their per-token objective."""
    log_probs = token_log_probs(output, batch.labels, grpo.grpo_temperature, tp_group)
    if batch.old_log_probs is None:
        batch.old_log_probs = log_probs.detach()
    result = grpo_loss(
        log_probs, batch.old_log_probs, batch.advantages, batch.loss_mask, grpo.grpo_clip_epsilon
    )
    rows = torch.tensor(float(log_probs.shape[0]), dtype=torch.double, device=output.device)
    total = result.loss * log_probs.shape[0]
    tokens = batch.loss_mask.sum().double()
    reports = {
        "grpo loss": torch.stack([total.detach().double(), rows]),
        "clipped": torch.stack([result.clipped_fraction.double() * tokens, tokens]),
    }
    return total, torch.tensor(log_probs.shape[0], dtype=torch.int, device=output.device), reports


def rewrite_forward_step(loss_func, data_iterator, model):
    batch = next(data_iterator)
    output = model(batch.tokens, batch.position_ids, None)
    tp_group = unwrap_model(model).pg_collection.tp
    return output, partial(loss_func, batch, tp_group)


def rewriter_rl_trainer(
    job,
    config,
    judge: Judge,
    prompts: Iterator[list[RewritePrompt]],
    tokenizer,
    template: Template,
    seed: int,
) -> Trainer:
    """The loop's view of rewriter RL: each step samples the global batch's rewrites, has them
    judged, and takes --grpo-updates-per-batch optimizer steps on them."""
    training, grpo, rl = config.training, config.grpo, config.rewriter_rl
    data_parallel = job.pg_collection.dp.size()
    num_microbatches = training.num_microbatches(data_parallel)
    seq_length = config.model.seq_length
    sampling = SamplingConfig(sip_temperature=grpo.grpo_temperature, sip_top_p=grpo.grpo_top_p)
    groups = grpo.grpo_group_size
    rank = job.pg_collection.dp.rank()
    stop = stop_token_ids(template, tokenizer)

    def step(state: TrainState) -> StepOutput:
        start = time.perf_counter()
        batches, columns, samples = [], [], []
        model = job.model_chunks[0]
        for index in range(num_microbatches):
            chunk = next(prompts)
            rollouts = generate(
                model,
                [p.ids for p in chunk],
                num_samples=groups,
                num_tokens=rl.rewriter_rl_max_tokens,
                sampling=sampling,
                seed=hash((seed, state.iteration, rank, index)) % (2**31),
                eod=tokenizer.eod,
                stop=stop,
                vocab_size=tokenizer.vocab_size,
            )
            flat_tokens = rollouts.tokens.reshape(-1, rollouts.tokens.shape[-1])
            lengths, finished = rewrite_lengths(
                flat_tokens, rollouts.mask.reshape(flat_tokens.shape), tokenizer, template.stop
            )
            texts = [
                rewrite_text(
                    flat_tokens[i, : lengths[i]].tolist(),
                    tokenizer,
                    template,
                    chunk[i // groups].original,
                )
                for i in range(len(lengths))
            ]
            judged = judge_rewrites(
                judge, chunk, [texts[p * groups : (p + 1) * groups] for p in range(len(chunk))]
            )
            rewards = torch.tensor(
                [float("nan") if r is None else r for r in judged.rewards], dtype=torch.double
            ).view(len(chunk), groups)
            # A missing reward takes its group's mean: no advantage either way.
            fill = torch.nanmean(rewards, dim=1, keepdim=True).nan_to_num(0.0)
            rewards = torch.where(rewards.isnan(), fill, rewards)
            advantages = group_advantages(rewards)
            batches.append(
                rewrite_micro_batch(
                    chunk, rollouts.tokens, lengths, advantages, seq_length,
                    device=flat_tokens.device,
                )
            )  # fmt: skip
            columns.append(judged)
            samples.append((rewards, finished))
        generated = time.perf_counter()
        metrics, successful = {}, True
        for update in range(grpo.grpo_updates_per_batch):
            last = update == grpo.grpo_updates_per_batch - 1
            result = train_step(
                partial(rewrite_forward_step, partial(rewrite_loss_func, grpo)),
                iter(batches),
                job.model_chunks,
                job.optimizer,
                job.scheduler,
                num_microbatches=num_microbatches,
                seq_length=seq_length,
                micro_batch_size=batches[0].tokens.shape[0],
                samples_per_step=training.global_batch(data_parallel) if last else 0,
            )
            successful = successful and result.update_successful
            if update == 0:
                metrics["rewriter/grpo loss"] = result.losses.get("grpo loss", 0.0)
            metrics["rewriter/clipped"] = result.losses.get("clipped", 0.0)
            if result.grad_norm is not None:
                metrics["grad-norm"] = result.grad_norm
        metrics.update(_reward_metrics(columns, samples, job.pg_collection.dp))
        metrics["rewriter/generate-seconds"] = generated - start
        metrics["rewriter/step-seconds"] = time.perf_counter() - start
        stop_reason = None
        if metrics["rewriter/missing-rewards"] > rl.rewriter_rl_max_missing_rewards:
            stop_reason = (
                f"{metrics['rewriter/missing-rewards']:.0%} of this step's rewards are missing "
                f"(--rewriter-rl-max-missing-rewards {rl.rewriter_rl_max_missing_rewards}): the "
                f"judge is not judging ({getattr(judge, 'identity', type(judge).__name__)})"
            )
        return StepOutput(metrics, successful, stop=stop_reason)

    def describe(metrics: dict[str, float]) -> list[str]:
        parts = [
            f"grpo loss {metrics['rewriter/grpo loss']:.6E}",
            f"reward {metrics['rewriter/reward']:.3f}",
            f"copy rate (safe) {metrics['rewriter/copy-rate-safe']:.3f}",
            f"rewrite safety (unsafe) {metrics['rewriter/rewrite-safety-unsafe']:.3f}",
            f"quality vs original (unsafe) {metrics['rewriter/quality-unsafe']:.3f}",
            f"missing rewards {metrics['rewriter/missing-rewards']:.3f}",
        ]
        if "grad-norm" in metrics:
            parts.append(f"grad norm {metrics['grad-norm']:.4f}")
        return parts

    return Trainer(
        step=step,
        save=partial(job.save, config.checkpoint),
        learning_rate=job.learning_rate,
        samples_per_step=training.global_batch(data_parallel),
        describe=describe,
        model_chunks=job.model_chunks,
    )


# (sum, count) pairs reduced over data-parallel ranks: every rank logs the global means.
_REWARD_METRICS = (
    "reward",
    "copy-rate-safe",
    "rewrite-safety-unsafe",
    "quality-unsafe",
    "missing-rewards",
    "unfinished",
    "reward-spread",
)


def _reward_metrics(columns, samples, dp_group) -> dict[str, float]:
    sums = dict.fromkeys(_REWARD_METRICS, 0.0)
    counts = dict.fromkeys(_REWARD_METRICS, 0.0)

    def add(name, values):
        values = [float(v) for v in values if v is not None]
        sums[name] += sum(values)
        counts[name] += len(values)

    for judged, (rewards, finished) in zip(columns, samples):
        add("reward", [r for r in judged.rewards])
        add("copy-rate-safe", [c for c, s in zip(judged.copied, judged.safe_context) if s])
        add("rewrite-safety-unsafe", judged.safety)
        add("quality-unsafe", judged.quality)
        add("missing-rewards", [float(not score_present(r)) for r in judged.rewards])
        add("unfinished", [float(not ended) for ended in finished])
        add("reward-spread", rewards.std(dim=1, unbiased=False).tolist())
    totals = torch.tensor(
        [[sums[n], counts[n]] for n in _REWARD_METRICS], dtype=torch.double, device=torch_device()
    )
    if dp_group.size() > 1:
        torch.distributed.all_reduce(totals, group=dp_group)
    return {
        f"rewriter/{name}": (total / count if count else float("nan"))
        for name, (total, count) in zip(_REWARD_METRICS, totals.tolist())
    }
