"""Seconds and tokens per phase of a training step (rollouts, judging, the policy update...)."""

from __future__ import annotations

import dataclasses
import time

import torch


def synchronize() -> None:
    """Waits for queued device work so phase timings mean something on GPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@dataclasses.dataclass
class PhaseTimes:
    """Seconds and tokens processed per phase of a step."""

    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    tokens: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, phase: str, seconds: float, tokens: int = 0) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.tokens[phase] = self.tokens.get(phase, 0) + tokens

    def phase(self, name: str) -> PhaseTimer:
        """``with times.phase("rollout") as timer: ...; timer.tokens = n``."""
        return PhaseTimer(self, name)


class PhaseTimer:
    """Times one phase (device work included) and records the tokens it processed. The phase is
    also a ``torch.profiler`` range, so a profile of a step groups its work by phase."""

    def __init__(self, times: PhaseTimes, phase: str):
        self.times, self.phase, self.tokens = times, phase, 0
        self.range = torch.profiler.record_function(f"phase/{phase}")

    def __enter__(self) -> PhaseTimer:
        synchronize()
        self.range.__enter__()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize()
        seconds = time.perf_counter() - self.start
        self.range.__exit__(*exc)
        self.times.add(self.phase, seconds, self.tokens)
