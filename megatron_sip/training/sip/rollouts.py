"""The policy's K rollouts per prefix (METHOD step 3), micro-batch by micro-batch, with the prefix
prefilled once and its KV cache shared by the K samples (``inference/generation.py``).

Sampling is seeded by the step's position (seed, iteration, data-parallel rank, micro-batch), so
an interrupted and resumed run samples exactly what the uninterrupted one did, and every rank of
a model-parallel group samples the same tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from megatron_sip.inference.generation import generate
from megatron_sip.inference.sampling import SamplingConfig


def rollout_seed(seed: int, iteration: int, data_parallel_rank: int, micro_batch: int) -> int:
    """The rollouts' sampling seed: a pure function of the step's position."""
    return (seed * 1_000_003 + iteration * 7919 + data_parallel_rank * 131 + micro_batch) % 2**62


@dataclasses.dataclass
class PrefixRollouts:
    """One prefix's K rollouts, each cut after its first EOD, and each one's log-probability
    under the distribution it was sampled from (summed over its tokens)."""

    tokens: list[list[int]]
    log_probs: list[float]


@dataclasses.dataclass
class RolloutSampler:
    policy: object  # the policy's model chunk
    sampling: SamplingConfig
    num_rollouts: int  # K
    num_tokens: int  # N, the suffix length
    eod: int
    vocab_size: int  # the tokenizer's, unpadded: sampling never draws padding ids

    def sample(
        self,
        micro_batches: Sequence[Sequence[Sequence[int]]],
        *,
        seed: int,
        iteration: int,
        data_parallel_rank: int,
    ) -> list[PrefixRollouts]:
        """Rollouts of every prefix of the micro-batches (lists of prefix token lists), in order."""
        out = []
        for index, prefixes in enumerate(micro_batches):
            generated = generate(
                self.policy,
                prefixes,
                num_samples=self.num_rollouts,
                num_tokens=self.num_tokens,
                sampling=self.sampling,
                seed=rollout_seed(seed, iteration, data_parallel_rank, index),
                eod=self.eod,
                vocab_size=self.vocab_size,
            )
            log_probs = generated.sequence_log_probs().tolist()
            for tokens, sums in zip(generated.as_candidates(), log_probs):
                out.append(PrefixRollouts(tokens, sums))
        return out
