"""Next-token training data: Megatron's GPTDataset over indexed datasets, read in a fixed order.

The datasets (and their blend) come from ``BlendedMegatronDatasetBuilder``; each rank then reads
micro-batches in an order that is a pure function of how many samples were consumed, so a run
resumed from a checkpoint (which stores that count) sees exactly the data the uninterrupted run
would have seen.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_sip.data.config import DataConfig


@dataclasses.dataclass
class SplitDatasets:
    train: Optional[torch.utils.data.Dataset]
    valid: Optional[torch.utils.data.Dataset]
    test: Optional[torch.utils.data.Dataset]


def split_sample_counts(train_iters: int, eval_iters: int, global_batch: int) -> list[int]:
    """Samples each split must provide. Every evaluation reads the same first ``eval_iters``
    validation batches, so validation losses are comparable across a run."""
    return [train_iters * global_batch, eval_iters * global_batch, eval_iters * global_batch]


def build_gpt_datasets(
    data: DataConfig,
    tokenizer,
    *,
    seq_length: int,
    seed: int,
    num_samples: list[int],
) -> SplitDatasets:
    """Train/validation/test GPTDatasets (blended when several prefixes are given)."""
    prefixes, weights = data.blend()
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.exists(prefix + suffix):
                raise FileNotFoundError(
                    f"--data-path: {prefix + suffix} does not exist (give the prefix without "
                    "the .bin/.idx suffix, as written by tools/preprocess_data.py)"
                )
    cache = data.data_cache_path or os.path.join(os.path.dirname(prefixes[0]) or ".", "cache")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=data.split,
        path_to_cache=cache,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, num_samples, lambda: True, config
    ).build()
    return SplitDatasets(train, valid, test)


class OrderedBatchSampler(torch.utils.data.Sampler):
    """Megatron-LM's pretraining order: global batch ``b`` holds samples ``[b*G, (b+1)*G)`` and
    each data-parallel rank reads its contiguous slice of every global batch, one micro-batch at a
    time, starting after ``consumed_samples``."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ):
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.step = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.step

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed_samples
        while start + self.step <= self.total_samples:
            first = start + self.rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
            start += self.step


def batch_iterator(
    dataset,
    *,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
    device: Optional[torch.device] = None,
) -> Iterator[dict]:
    """Micro-batches ``{tokens, labels, loss_mask, position_ids}`` on ``device``, in order."""
    sampler = OrderedBatchSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=False
    )
    for batch in loader:
        yield {
            key: batch[key].to(device) if device is not None else batch[key]
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        }
