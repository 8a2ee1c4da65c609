"""What a SIP step logs from its candidates: rewards and scores per candidate type, what was
chosen, what was skipped or missing, and where the time went. Summed over data-parallel ranks
(the ranks of a model-parallel group hold identical values). The loss-side metrics (losses,
margins, the KL estimate) come from the loss function's reports."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_sip.training.sip.candidates import ScoredSample
from megatron_sip.training.sip.judging import KINDS
from megatron_sip.training.timers import PhaseTimes

PHASES = (
    "rewrite",
    "rollout",
    "judge",
    "reference",
    "forward_backward",
    "optimizer",
    "reference_update",
)
SKIP_REASONS = ("no_chosen", "no_rejected", "small_gap")


class _Accumulator:
    def __init__(self):
        self.sums: dict[str, list[float]] = {}  # name -> [sum, count]
        self.maxima: dict[str, float] = {}

    def mean(self, name: str, value: float, count: float = 1.0) -> None:
        entry = self.sums.setdefault(name, [0.0, 0.0])
        entry[0] += value
        entry[1] += count

    def maximum(self, name: str, value: float) -> None:
        self.maxima[name] = max(self.maxima.get(name, float("-inf")), value)


def step_metrics(
    scored: Sequence[Sequence[ScoredSample]],
    times: PhaseTimes,
    objectives: Sequence[str],
    data_parallel_group,
) -> dict[str, float]:
    """The step's ``sip/...`` scalars, reduced over data-parallel ranks (every rank calls)."""
    acc = _Accumulator()
    samples = [sample for batch in scored for sample in batch]
    for kind in KINDS:
        acc.mean(f"sip/reward/{kind}-mean", 0.0, 0.0)
        acc.maximum(f"sip/reward/{kind}-max", float("-inf"))
        for objective in objectives:
            acc.mean(f"sip/{objective}/{kind}-mean", 0.0, 0.0)
        acc.mean(f"sip/chosen-share/{kind}", 0.0, 0.0)
    for reason in SKIP_REASONS:
        acc.mean(f"sip/skipped/{reason}", 0.0, 0.0)
    for name in ("sip/missing-scores", "sip/missing-rewrites", "sip/prefixes", "sip/pairs"):
        acc.mean(name, 0.0, 0.0)

    for sample in samples:
        acc.mean("sip/prefixes", 1.0, 0.0)
        acc.mean("sip/missing-rewrites", float(sample.rewrite is None), 0.0)
        rewards = sample.rewards.by_kind()
        for kind in KINDS:
            for reward, scores in zip(rewards[kind], sample.scores[kind]):
                if reward is not None:
                    acc.mean(f"sip/reward/{kind}-mean", reward)
                    acc.maximum(f"sip/reward/{kind}-max", reward)
                for objective in objectives:
                    score = scores.get(objective)
                    if score is not None:
                        acc.mean(f"sip/{objective}/{kind}-mean", score)
                    elif objective in scores and not (kind == "rewrite" and sample.rewrite is None):
                        acc.mean("sip/missing-scores", 1.0, 0.0)
        selection = sample.selection
        if selection.chosen is not None:
            for kind in KINDS:
                acc.mean(f"sip/chosen-share/{kind}", float(selection.chosen.kind == kind))
        if selection.skipped is not None:
            acc.mean(f"sip/skipped/{selection.skipped}", 1.0, 0.0)
        elif selection.chosen is not None:
            acc.mean("sip/pairs", 1.0, 0.0)
    for phase in PHASES:
        acc.mean(f"_seconds/{phase}", times.seconds.get(phase, 0.0), 0.0)
        acc.mean(f"_tokens/{phase}", float(times.tokens.get(phase, 0)), 0.0)

    names = sorted(acc.sums)
    sums = torch.tensor([acc.sums[n] for n in names], dtype=torch.float64)
    max_names = sorted(acc.maxima)
    maxima = torch.tensor([acc.maxima[n] for n in max_names], dtype=torch.float64)
    data_parallel = data_parallel_group.size()
    if data_parallel > 1:
        group = data_parallel_group
        torch.distributed.all_reduce(sums, group=group)
        torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX, group=group)
    reduced = dict(zip(names, sums.tolist()))
    metrics: dict[str, float] = {}
    for name, (total, count) in reduced.items():
        if name.startswith("_"):
            continue
        if count > 0:
            metrics[name] = total / count
        elif name.startswith(("sip/skipped", "sip/missing", "sip/prefixes", "sip/pairs")):
            metrics[name] = total  # counts over the global batch
    metrics["sip/skipped-pairs"] = sum(
        reduced[f"sip/skipped/{reason}"][0] for reason in SKIP_REASONS
    )
    for name, value in zip(max_names, maxima.tolist()):
        if value != float("-inf"):
            metrics[name] = value
    # Each data-parallel rank times its own phases: report the mean over ranks' seconds and
    # tokens/s over the whole global batch.
    for phase in PHASES:
        seconds = reduced[f"_seconds/{phase}"][0] / data_parallel
        tokens = reduced[f"_tokens/{phase}"][0]
        if phase in times.seconds:
            metrics[f"sip/time/{phase}"] = seconds
            if tokens > 0 and seconds > 0:
                metrics[f"sip/tokens-per-second/{phase}"] = tokens / seconds
    return metrics
