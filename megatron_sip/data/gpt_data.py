"""Next-token training data: Megatron's GPTDataset over indexed datasets, read in a fixed order.

The datasets (and their blend) come from ``BlendedMegatronDatasetBuilder``; each rank then reads
micro-batches in an order that is a pure function of how many samples were consumed, so a run
resumed from a checkpoint (which stores that count) sees exactly the data the uninterrupted run
would have seen.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Iterator
from typing import Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, IndexedDataset

from megatron_sip.data.config import DataConfig
from megatron_sip.errors import ConfigError
from megatron_sip.log import print_rank_0

# Index header: magic, version (u64), dtype code (u8), sequence count (u64), document count (u64).
_HEADER_BYTES = len(_INDEX_HEADER) + struct.calcsize("<QBQQ")


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
    """Train/validation/test GPTDatasets (blended when several prefixes are given), or
    Megatron-Core's MockGPTDataset splits with --mock-data. Every dataset file is checked first:
    a missing or damaged one raises :class:`ConfigError` naming it."""
    if data.mock_data:
        blend, cache, dataset_type = None, data.data_cache_path, MockGPTDataset
        if data.split != DataConfig.split:
            print_rank_0(
                f"--split {data.split}: not used with --mock-data (Megatron-Core splits mock data "
                "evenly, as in Megatron-LM)"
            )
    else:
        prefixes, weights = data.blend()
        for prefix in prefixes:
            check_indexed_dataset(prefix)
        blend, dataset_type = (prefixes, weights), GPTDataset
        cache = data.data_cache_path or os.path.join(os.path.dirname(prefixes[0]) or ".", "cache")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=data.split,
        path_to_cache=cache,
        mmap_bin_files=data.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=data.create_attention_mask_in_dataloader,
    )
    if not data.mock_data:
        for prefix in blend[0]:
            _check_splits_have_documents(prefix, config.split_matrix, data.split)
    train, valid, test = BlendedMegatronDatasetBuilder(
        dataset_type, num_samples, lambda: True, config
    ).build()
    return SplitDatasets(train, valid, test)


def _check_splits_have_documents(prefix: str, split_matrix, split: str) -> None:
    """Megatron-Core builds every split with a non-zero share and loops forever over one that
    got no document (a small dataset under a split like 949,50,1): refuse that instead."""
    documents = len(IndexedDataset(prefix, mmap=False).document_indices) - 1
    for name, bounds in zip(("train", "validation", "test"), split_matrix):
        if bounds is None:
            continue
        # The document range Megatron-Core gives the split (BlendedMegatronDatasetBuilder).
        if int(round(bounds[0] * documents)) == int(round(bounds[1] * documents)):
            raise ConfigError(
                "--split",
                f"{split} leaves the {name} split of {prefix} ({documents} documents) without a "
                f"document; give that split a share of 0 or a larger share, or use more data",
            )


def check_indexed_dataset(prefix: str) -> None:
    """Checks that ``prefix``.idx/.bin exist and agree, as Megatron-Core's ``IndexedDataset``
    reads them (header, version, dtype code, sequence and document counts, then the lengths,
    pointers and document indices arrays; the last sequence ends inside the ``.bin``), so a
    missing, truncated or foreign file is reported by path instead of as an assertion or a
    numpy error deep inside the dataset builder."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    rebuild = "rebuild the dataset with tools/preprocess_data.py"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise ConfigError(
                "--data-path",
                f"{path} does not exist (give the prefix without the .bin/.idx suffix, as "
                "written by tools/preprocess_data.py --output-prefix)",
            )
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as stream:
        header = stream.read(_HEADER_BYTES)
        if len(header) < _HEADER_BYTES or header[:9] != _INDEX_HEADER:
            raise ConfigError(
                "--data-path",
                f"{idx_path} is not a Megatron indexed-dataset index (bad or truncated header); "
                + rebuild,
            )
        version, code, sequences, documents = struct.unpack("<QBQQ", header[9:])
        if version != 1:
            raise ConfigError(
                "--data-path", f"{idx_path} has index version {version}, expected 1; " + rebuild
            )
        try:
            item_size = DType.size(code)
        except ValueError:
            raise ConfigError(
                "--data-path", f"{idx_path} has unknown token dtype code {code}; " + rebuild
            ) from None
        expected = _HEADER_BYTES + sequences * (4 + 8) + documents * 8
        if idx_size < expected:
            raise ConfigError(
                "--data-path",
                f"{idx_path} is truncated: {idx_size} bytes, its header announces {sequences} "
                f"sequences and {documents} document indices ({expected} bytes); " + rebuild,
            )
        if sequences == 0:
            return
        stream.seek(_HEADER_BYTES + (sequences - 1) * 4)
        (last_length,) = struct.unpack("<i", stream.read(4))
        stream.seek(_HEADER_BYTES + sequences * 4 + (sequences - 1) * 8)
        (last_pointer,) = struct.unpack("<q", stream.read(8))
    bin_needed = last_pointer + last_length * item_size
    bin_size = os.path.getsize(bin_path)
    if last_length < 0 or last_pointer < 0 or bin_size < bin_needed:
        raise ConfigError(
            "--data-path",
            f"{bin_path} is too short ({bin_size} bytes) for its index {idx_path}, which needs "
            f"{bin_needed}: the .bin is truncated or belongs to another index; " + rebuild,
        )


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
    """Micro-batches ``{tokens, labels, loss_mask, position_ids}`` (and ``attention_mask`` when
    the dataset makes one) on ``device``, in order."""
    sampler = OrderedBatchSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=False
    )
    for batch in loader:
        yield {
            key: batch[key].to(device) if device is not None else batch[key]
            for key in ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")
            if key in batch
        }
