"""The SIP step: each step collects and scores candidates for its global batch of prefixes,
scores the objective's candidates under the EMA reference, updates the policy with the Megatron
optimizer, then the reference. The generic loop (``training/loop.py``) runs the steps, logs,
evaluates and saves. Checkpoints hold the policy, optimizer, schedule, RNG, the fp32 reference,
the score store and the data position, so a resumed run repeats the uninterrupted one exactly."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Optional

import torch

from megatron_sip.data.sip_dataset import SIPSampleStream
from megatron_sip.inference.scoring import length_multiple
from megatron_sip.models.checkpointing import CheckpointConfig
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.loop import StepOutput, Trainer, TrainState
from megatron_sip.training.setup import TrainingSetup
from megatron_sip.training.sip.batches import (
    BatchBuilder,
    attach_reference_log_probs,
    global_counts,
    sip_forward_step,
    validation_batch,
    validation_step,
)
from megatron_sip.training.sip.candidates import CandidateCollector, ScoredSample
from megatron_sip.training.sip.config import SIPConfig
from megatron_sip.training.sip.metrics import step_metrics
from megatron_sip.training.sip.objectives import Objective
from megatron_sip.training.sip.reference import EMAReference
from megatron_sip.training.sip.score_store import ScoreStore
from megatron_sip.training.step import (
    StepResult,
    broadcast_from_last_stage,
    forward_backward,
    train_step,
)
from megatron_sip.training.timers import PhaseTimes

CHECKPOINT_KEY = "sip"  # common-state key that marks a SIP checkpoint (vs. a pretraining one)


@dataclasses.dataclass
class SIPState(TrainState):
    """TrainState plus the score store (training state: cached judge scores)."""

    score_store: ScoreStore = dataclasses.field(default_factory=ScoreStore)

    def restore(self, iteration: int, extra: dict) -> None:
        super().restore(iteration, extra)
        self.score_store.load_state_dict(extra[CHECKPOINT_KEY]["score_store"])


def merged_score_store(store: ScoreStore, data_parallel_group) -> ScoreStore:
    """One store with every data-parallel rank's entries (each rank caches its own samples)."""
    if data_parallel_group.size() == 1:
        return store
    states = [None] * data_parallel_group.size()
    torch.distributed.all_gather_object(states, store.state_dict(), group=data_parallel_group)
    merged = ScoreStore(store.max_entries)
    for state in states:
        part = ScoreStore()
        part.load_state_dict(state)
        merged.update(part)
    merged.hits, merged.misses = store.hits, store.misses
    return merged


def judge_counts(counts: tuple[int, int], data_parallel_group) -> dict[str, float]:
    """The step's scores asked of the judge and missing among them, over data-parallel ranks
    (cached scores and the original's quality against itself are not asked)."""
    totals = torch.tensor(counts, dtype=torch.float64)
    if data_parallel_group.size() > 1:
        torch.distributed.all_reduce(totals, group=data_parallel_group)
    asked, missing = totals.tolist()
    return {"sip/judge-scores-asked": asked, "sip/judge-scores-missing": missing}


@dataclasses.dataclass
class MissingGuard:
    """Stops a run whose judge (or rewriter) stopped answering: the share of missing judge scores
    (of those asked for) and of missing rewrites over the last ``window`` steps, against
    --sip-max-missing-scores / --sip-max-missing-rewrites; at once after a step in which every
    score (or every rewrite) is missing."""

    max_missing_scores: float
    max_missing_rewrites: Optional[float]  # None: rewrites come from a store, not a rewriter
    window: int
    describe: Callable[[], str] = lambda: ""
    history: list = dataclasses.field(default_factory=list)  # (missing, asked, missing rw, n)

    def update(self, metrics: dict[str, float]) -> Optional[str]:
        """Why to stop after this step's metrics, or None."""
        self.history.append(
            (
                metrics.get("sip/judge-scores-missing", 0.0),
                metrics.get("sip/judge-scores-asked", 0.0),
                metrics.get("sip/missing-rewrites", 0.0),
                metrics.get("sip/prefixes", 0.0),
            )
        )
        self.history = self.history[-self.window :]
        # Judged over a full window, or at once when a step got no score or rewrite at all.
        last = self.history[-1]
        if len(self.history) < self.window and not (
            (last[1] and last[0] == last[1]) or (last[3] and last[2] == last[3])
        ):
            return None
        missing, asked, missing_rewrites, prefixes = (sum(c) for c in zip(*self.history))
        steps = len(self.history)
        if asked and missing / asked > self.max_missing_scores:
            return (
                f"{missing:.0f} of the {asked:.0f} scores asked of the judge in the last {steps} "
                f"steps are missing ({missing / asked:.0%} > --sip-max-missing-scores "
                f"{self.max_missing_scores}); the judge is not judging: {self.describe()}"
            )
        limit = self.max_missing_rewrites
        if limit is not None and prefixes and missing_rewrites / prefixes > limit:
            return (
                f"{missing_rewrites:.0f} of {prefixes:.0f} rewrites in the last {steps} steps are "
                f"missing ({missing_rewrites / prefixes:.0%} > --sip-max-missing-rewrites "
                f"{limit}); the rewriter is not rewriting: {self.describe()}"
            )
        return None


@dataclasses.dataclass
class SIPTrainer:
    job: TrainingSetup
    objective: Objective
    collector: CandidateCollector
    batches: BatchBuilder
    reference: Optional[EMAReference]
    stream: SIPSampleStream
    sip: SIPConfig
    training: TrainingConfig
    judge_objectives: tuple[str, ...]  # --sip-objectives (metrics per objective)
    fused: bool  # candidate log-probs from hidden states (--sip-fused-logprob)
    guard: Optional[MissingGuard] = None  # stops a run whose roles stopped answering
    valid_stream: Optional[Callable[[], SIPSampleStream]] = None  # a fresh one per evaluation
    seq_length: int = 0  # validation rows: prefix + suffix
    last_scored: Optional[list] = None  # the last step's candidates (tests, debugging)

    @property
    def groups(self):
        return self.job.pg_collection

    @property
    def global_batch(self) -> int:
        return self.training.global_batch(self.groups.dp.size())

    def step(self, state: SIPState) -> StepOutput:
        """One SIP step (``state.iteration`` steps are done); metrics identical on every rank."""
        num_microbatches = self.training.num_microbatches(self.groups.dp.size())
        times = PhaseTimes()
        micro_batches = [next(self.stream) for _ in range(num_microbatches)]
        scored = self.collector.collect(
            micro_batches,
            iteration=state.iteration,
            seed=self.training.seed,
            data_parallel_rank=self.groups.dp.rank(),
            store=state.score_store,
            times=times,
        )
        self.last_scored = scored
        result = self.update(scored, state.iteration, times)
        metrics = {f"sip/{name.replace(' ', '-')}": value for name, value in result.losses.items()}
        metrics.update(step_metrics(scored, times, self.judge_objectives, self.groups.dp))
        if self.collector.judging is not None:
            metrics.update(judge_counts(self.collector.judging.take_counts(), self.groups.dp))
        if result.grad_norm is not None:
            metrics["grad-norm"] = result.grad_norm
        metrics["loss-scale"] = self.job.optimizer.get_loss_scale().item()
        stop = self.guard.update(metrics) if self.guard is not None else None
        return StepOutput(metrics, result.update_successful, stop=stop)

    def update(
        self, scored: list[list[ScoredSample]], iteration: int, times: PhaseTimes
    ) -> StepResult:
        """The policy update of step ``iteration`` from its scored micro-batches: the reference
        scores the objective's candidates, the policy's forward/backward and optimizer step, then
        the reference update (phases ``reference``, ``forward_backward``, ``optimizer``,
        ``reference_update``)."""
        model = self.job.model_chunks[0]
        batches, length, reference_length = self.batches.build(model, scored)
        counts = global_counts(batches, self.objective, self.sip, self.groups.dp)
        if self.reference is not None:
            with times.phase("reference") as timer:
                attach_reference_log_probs(
                    self.reference.module, batches, reference_length, self.fused
                )
                timer.tokens = sum(b.reference_packed.tokens.numel() for b in batches)
        result = train_step(
            partial(sip_forward_step, self.objective, self.sip, counts, self.fused),
            iter(batches),
            self.job.model_chunks,
            self.job.optimizer,
            self.job.scheduler,
            num_microbatches=len(batches),
            seq_length=length,
            micro_batch_size=batches[0].packed.tokens.shape[0],
            samples_per_step=self.global_batch,
            times=times,
        )
        times.add("forward_backward", 0.0, sum(b.packed.tokens.numel() for b in batches))
        if self.reference is not None:
            with times.phase("reference_update"):
                self.reference.maybe_update(iteration + 1, result.update_successful)
        return result

    def save(self, checkpoint: CheckpointConfig, state: SIPState) -> None:
        store = merged_score_store(state.score_store, self.groups.dp)
        extra = {
            CHECKPOINT_KEY: {
                "score_store": store.state_dict(),
                "has_reference": self.reference is not None,
            }
        }
        modules = self.reference.checkpoint_modules() if self.reference is not None else None
        self.job.save(checkpoint, state, extra=extra, extra_modules=modules)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """NLL of the original suffixes of held-out (prefix, suffix) samples: how well the
        policy still models the data (--eval-iters global batches of the validation split)."""
        model = self.job.model_chunks[0]
        stream = self.valid_stream()
        num_microbatches = self.training.num_microbatches(self.groups.dp.size())
        # Sequence parallelism needs row lengths divisible by the TP size (layout_for pads too).
        multiple = math.lcm(self.batches.length_multiple, length_multiple(model))
        length = -(-self.seq_length // multiple) * multiple
        reports = []
        model.eval()
        for _ in range(self.training.eval_iters):
            packed = [
                validation_batch(
                    model, next(stream), self.batches.pad_id, length, self.batches.device
                )
                for _ in range(num_microbatches)
            ]
            reports += forward_backward(
                partial(validation_step, self.fused),
                iter(packed),
                self.job.model_chunks,
                num_microbatches=num_microbatches,
                seq_length=length,
                micro_batch_size=packed[0].tokens.shape[0],
                forward_only=True,
            )
        model.train()
        return broadcast_from_last_stage(reports, self.job.model_chunks)

    def loop(self, checkpoint: CheckpointConfig) -> Trainer:
        """What the generic training loop runs."""
        return Trainer(
            step=self.step,
            save=partial(self.save, checkpoint),
            learning_rate=self.job.learning_rate,
            samples_per_step=self.global_batch,
            evaluate=self.evaluate if self.valid_stream is not None else None,
            describe=describe_step,
            model_chunks=self.job.model_chunks,
        )


def describe_step(metrics: dict[str, float]) -> list[str]:
    """The SIP part of a console line."""
    parts = [f"loss {metrics.get('sip/loss', float('nan')):.4f}"]
    kinds = ("original", "rewrite", "rollout")
    rewards = [
        f"{kind} {metrics[f'sip/reward/{kind}-mean']:.3f}"
        for kind in kinds
        if f"sip/reward/{kind}-mean" in metrics
    ]
    if rewards:
        parts.append("reward " + " ".join(rewards))
    chosen = [
        f"{kind} {metrics[f'sip/chosen-share/{kind}']:.2f}"
        for kind in kinds
        if f"sip/chosen-share/{kind}" in metrics
    ]
    if chosen:
        parts.append("chosen " + " ".join(chosen))
    for label, name in (
        ("margin", "sip/dpo-margin"),
        ("pref acc", "sip/preference-accuracy"),
        ("kl", "sip/kl-rollouts"),
    ):
        if name in metrics:
            parts.append(f"{label} {metrics[name]:.3f}")
    parts.append(f"skipped pairs {int(metrics.get('sip/skipped-pairs', 0))}")
    if metrics.get("sip/missing-scores"):
        parts.append(f"missing scores {int(metrics['sip/missing-scores'])}")
    if "grad-norm" in metrics:
        parts.append(f"grad norm {metrics['grad-norm']:.4f}")
    timing = [
        f"{phase} {metrics[f'sip/time/{phase}']:.2f}s"
        for phase in ("rewrite", "rollout", "judge", "reference", "forward_backward", "optimizer")
        if f"sip/time/{phase}" in metrics
    ]
    parts.append("time " + " ".join(timing))
    if "sip/tokens-per-second/rollout" in metrics:
        parts.append(f"rollout tokens/s {metrics['sip/tokens-per-second/rollout']:.0f}")
    return parts
