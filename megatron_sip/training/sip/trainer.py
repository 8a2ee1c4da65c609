"""The SIP training loop: each step collects and scores candidates for its global batch of
prefixes, scores the chosen/rejected pairs under the EMA reference, updates the policy with the
Megatron optimizer, then the reference. Checkpoints hold the policy, optimizer, schedule, RNG,
the reference, the score store and the data position, so a resumed run repeats the
uninterrupted one exactly."""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_sip.data.sip_dataset import SIPSampleStream
from megatron_sip.log import print_rank_0
from megatron_sip.models.checkpointing import CheckpointConfig, save_checkpoint
from megatron_sip.roles.rewards import ScoreStore
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.loop import TrainState
from megatron_sip.training.metrics import MetricWriter
from megatron_sip.training.setup import TrainingSetup
from megatron_sip.training.sip.batches import (
    attach_reference_log_probs,
    build_micro_batches,
    sip_forward_step,
)
from megatron_sip.training.sip.candidates import CandidateCollector, PhaseTimer, PhaseTimes
from megatron_sip.training.sip.config import SIPConfig
from megatron_sip.training.sip.metrics import step_metrics
from megatron_sip.training.sip.reference import EMAReference
from megatron_sip.training.step import train_step

CHECKPOINT_KEY = "sip"  # common-state key that marks a SIP checkpoint (vs. a pretraining one)


@dataclasses.dataclass
class SIPState(TrainState):
    """TrainState plus the score store (merged over data-parallel ranks when saved)."""

    score_store: ScoreStore = dataclasses.field(default_factory=ScoreStore)

    def as_checkpoint_extra(self) -> dict:
        return {
            **super().as_checkpoint_extra(),
            CHECKPOINT_KEY: {"score_store": merged_score_store(self.score_store).state_dict()},
        }

    def restore(self, extra: dict) -> None:
        self.consumed_train_samples = extra.get("consumed_train_samples", 0)
        self.score_store.load_state_dict(extra[CHECKPOINT_KEY]["score_store"])


def merged_score_store(store: ScoreStore) -> ScoreStore:
    """One store with every data-parallel rank's entries (each rank caches its own samples)."""
    if not torch.distributed.is_initialized():
        return store
    group = parallel_state.get_data_parallel_group()
    states = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(states, store.state_dict(), group=group)
    merged = ScoreStore(store.max_entries)
    for state in states:
        part = ScoreStore()
        part.load_state_dict(state)
        merged.update(part)
    merged.hits, merged.misses = store.hits, store.misses
    return merged


@dataclasses.dataclass
class SIPTrainer:
    job: TrainingSetup
    collector: CandidateCollector
    reference: Optional[EMAReference]
    stream: SIPSampleStream
    sip: SIPConfig
    training: TrainingConfig
    objectives: tuple[str, ...]
    seq_length_multiple: int = 1
    pad_id: int = 0
    device: Optional[torch.device] = None
    checkpoint_metadata: Optional[dict] = None
    last_scored: Optional[list] = None

    def step(self, state: SIPState) -> dict[str, float]:
        """One SIP step; returns its metrics (identical on every rank)."""
        dp_size = parallel_state.get_data_parallel_world_size()
        num_microbatches = self.training.num_microbatches(dp_size)
        global_batch = self.training.global_batch(dp_size)
        iteration = state.iteration  # steps done before this one
        times = PhaseTimes()
        micro_batches = [next(self.stream) for _ in range(num_microbatches)]
        self.collector.s.score_store = state.score_store
        scored = self.collector.collect(
            micro_batches,
            iteration=iteration,
            seed=self.training.seed,
            data_parallel_rank=parallel_state.get_data_parallel_rank(),
            times=times,
        )
        self.last_scored = scored  # for inspection (tests, debugging)
        model = self.job.model_chunks[0]
        batches, length = build_micro_batches(
            model,
            scored,
            self.sip,
            pad_id=self.pad_id,
            length_multiple=self.seq_length_multiple,
            device=self.device,
        )
        rows = batches[0].packed.tokens.shape[0]
        fused = self.sip.fused_logprob(self.device.type if self.device is not None else "cpu")
        positions = sum(b.packed.tokens.numel() for b in batches)
        if self.sip.sip_loss == "online_dpo":
            with PhaseTimer(times, "reference") as timer:
                attach_reference_log_probs(self.reference.module, batches, length, fused)
                timer.tokens = positions
        with PhaseTimer(times, "policy_update") as timer:
            result = train_step(
                partial(sip_forward_step, self.sip, fused),
                iter(batches),
                self.job.model_chunks,
                self.job.optimizer,
                self.job.scheduler,
                num_microbatches=num_microbatches,
                seq_length=length,
                micro_batch_size=rows,
                samples_per_step=global_batch,
            )
            timer.tokens = positions
        state.iteration += 1
        state.consumed_train_samples += global_batch
        if self.reference is not None:
            with PhaseTimer(times, "reference_update"):
                self.reference.maybe_update(state.iteration)
        metrics = {f"sip/{name.replace(' ', '-')}": value for name, value in result.losses.items()}
        metrics.update(step_metrics(scored, times, self.sip, self.objectives))
        if result.grad_norm is not None:
            metrics["train/grad-norm"] = result.grad_norm
        metrics["train/update-skipped"] = float(not result.update_successful)
        return metrics

    def save(self, checkpoint: CheckpointConfig, state: SIPState) -> None:
        extra = state.as_checkpoint_extra()
        extra[CHECKPOINT_KEY]["has_reference"] = self.reference is not None
        save_checkpoint(
            checkpoint.save,
            state.iteration,
            self.job.model_chunks,
            self.job.optimizer,
            self.job.scheduler,
            extra_common={**(self.checkpoint_metadata or {}), **extra},
            extra_modules={"reference": self.reference.module} if self.reference else None,
        )

    def train(
        self, state: SIPState, checkpoint: CheckpointConfig, writer: MetricWriter
    ) -> SIPState:
        """Steps until --train-iters (or --exit-interval), logging and saving on the way."""
        training = self.training
        saved_at = None
        while state.iteration < training.train_iters:
            learning_rate = self.job.optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            metrics = self.step(state)
            seconds = time.perf_counter() - start
            metrics["train/learning-rate"] = learning_rate
            metrics["train/seconds-per-step"] = seconds
            writer.scalars(metrics, state.iteration)
            if state.iteration % training.log_interval == 0 or (
                state.iteration == training.train_iters
            ):
                print_rank_0(format_step(state, training, metrics))
            done = state.iteration == training.train_iters
            exiting = bool(training.exit_interval) and state.iteration % training.exit_interval == 0
            periodic = checkpoint.save_interval and state.iteration % checkpoint.save_interval == 0
            if checkpoint.save and (periodic or exiting or done):
                self.save(checkpoint, state)
                saved_at = state.iteration
            if exiting and not done:
                print_rank_0(f"exiting at iteration {state.iteration} (--exit-interval)")
                return state
        if checkpoint.save and saved_at != state.iteration:
            self.save(checkpoint, state)
        return state


def format_step(state: SIPState, training: TrainingConfig, metrics: dict[str, float]) -> str:
    """One console line in Megatron's style."""

    def pick(name: str, fmt: str = "{:.4f}") -> Optional[str]:
        return fmt.format(metrics[name]) if name in metrics else None

    parts = [
        f"iteration {state.iteration:>6}/{training.train_iters}",
        f"consumed samples {state.consumed_train_samples}",
        f"elapsed per step (s) {metrics['train/seconds-per-step']:.2f}",
        f"learning rate {metrics['train/learning-rate']:.3E}",
        f"loss {metrics.get('sip/loss', float('nan')):.4f}",
    ]
    rewards = [
        f"{kind} {pick(f'sip/reward/{kind}-mean', '{:.3f}')}"
        for kind in ("original", "rewrite", "rollout")
        if f"sip/reward/{kind}-mean" in metrics
    ]
    if rewards:
        parts.append("reward " + " ".join(rewards))
    chosen = [
        f"{kind} {metrics[f'sip/chosen-share/{kind}']:.2f}"
        for kind in ("original", "rewrite", "rollout")
        if f"sip/chosen-share/{kind}" in metrics
    ]
    if chosen:
        parts.append("chosen " + " ".join(chosen))
    for label, name in (
        ("margin", "sip/dpo-margin"),
        ("pref acc", "sip/preference-accuracy"),
        ("kl", "sip/chosen-kl"),
    ):
        if name in metrics:
            parts.append(f"{label} {metrics[name]:.3f}")
    parts.append(f"skipped {int(metrics.get('sip/skipped-pairs', 0))}")
    if metrics.get("sip/missing-scores"):
        parts.append(f"missing scores {int(metrics['sip/missing-scores'])}")
    timing = [
        f"{phase} {metrics[f'sip/time/{phase}']:.2f}s"
        for phase in ("rewrite", "rollout", "judge", "reference", "policy_update")
        if f"sip/time/{phase}" in metrics
    ]
    parts.append("time " + " ".join(timing))
    if "sip/tokens-per-second/rollout" in metrics:
        parts.append(f"rollout tokens/s {metrics['sip/tokens-per-second/rollout']:.0f}")
    if metrics.get("train/update-skipped"):
        parts.append("update skipped")
    return " | ".join(parts)
