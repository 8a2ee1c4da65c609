"""The seeded, resumable order in which the role trainers go through their examples."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

Item = TypeVar("Item")


def shuffled_groups(
    items: Sequence[Item], size: int, seed: int, skip: int = 0
) -> Iterator[list[Item]]:
    """Endless groups of ``size`` items: each epoch a seeded shuffle cut into whole groups (the
    remainder waits for a later epoch's shuffle). The first ``skip`` groups, those a resumed
    run has trained on, are passed over: only their place in the order matters."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            if skip > 0:
                skip -= 1
                continue
            yield [items[i] for i in order[start : start + size]]
