"""(prefix, suffix) samples for SIP: the unit the policy continues and the judge scores.

For a document ``d`` and a split point ``j``, the original suffix is ``d[j : j + N]`` with
``N = --sip-suffix-len`` and the prefix is ``d[:j]`` truncated on the left to
``--seq-length - N`` tokens. Split points are drawn uniformly over the valid positions of each
document (``--sip-split-point uniform``) or taken at every stride of ``N``
(``--sip-split-point sliding``). Documents too short for a prefix of ``--sip-min-prefix-len``
tokens plus one suffix are skipped and counted.

Everything is a pure function of ``--seed`` and the sample index: the document order of each epoch
is a seeded permutation, blends follow Megatron's blending indices, and a reader's only state is
how many samples it consumed, which a checkpoint stores and restores exactly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Literal, Optional

import numpy as np
from megatron.core.datasets import helpers
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_sip.data.config import DataConfig
from megatron_sip.data.gpt_data import OrderedBatchSampler, check_indexed_dataset
from megatron_sip.errors import ConfigError, require_choice, require_positive

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass
class SIPDataConfig:
    """How documents are cut into (prefix, suffix) samples."""

    sip_suffix_len: int = 128
    """Suffix length N: tokens the policy generates and the judge scores per sample."""

    sip_split_point: Literal["uniform", "sliding"] = "uniform"
    """Where suffixes start: uniform (one random valid position per document per epoch) or
    sliding (every N tokens after the minimum prefix)."""

    sip_min_prefix_len: int = 1
    """Fewest prefix tokens a sample may have; shorter documents are skipped."""

    def __post_init__(self):
        require_positive("--sip-suffix-len", self.sip_suffix_len)
        require_positive("--sip-min-prefix-len", self.sip_min_prefix_len)
        require_choice("--sip-split-point", self.sip_split_point, ("uniform", "sliding"))

    def max_prefix_len(self, seq_length: int) -> int:
        room = seq_length - self.sip_suffix_len
        if room < self.sip_min_prefix_len:
            raise ConfigError(
                "--sip-suffix-len",
                f"--seq-length {seq_length} leaves {room} prefix tokens after a suffix of "
                f"{self.sip_suffix_len}; need at least --sip-min-prefix-len "
                f"{self.sip_min_prefix_len}",
            )
        return room


@dataclasses.dataclass(frozen=True)
class SIPSample:
    prefix: np.ndarray  # int64, at most seq_length - N tokens, the ones right before the suffix
    suffix: np.ndarray  # int64, exactly N tokens: the original continuation
    dataset: int  # index of the dataset in --data-path
    document: int  # document index within that dataset
    split_point: int  # j: token offset of the suffix in the document

    @property
    def key(self) -> tuple[int, int, int]:
        """Identifies the sample for data-only caches (rewrites, their judge scores)."""
        return (self.dataset, self.document, self.split_point)


class DocumentSplitPoints:
    """The samples of one indexed dataset's split, epoch after epoch."""

    def __init__(
        self,
        indexed: IndexedDataset,
        documents: range,
        sip: SIPDataConfig,
        seq_length: int,
        seed: int,
        dataset_index: int,
        split_index: int,
    ):
        self.indexed = indexed
        self.suffix_len = sip.sip_suffix_len
        self.min_prefix = sip.sip_min_prefix_len
        self.max_prefix = sip.max_prefix_len(seq_length)
        self.mode = sip.sip_split_point
        self.seed_words = [seed, dataset_index, split_index]
        self.dataset_index = dataset_index
        lengths = np.asarray(indexed.sequence_lengths)[documents.start : documents.stop]
        doc_ids = np.arange(documents.start, documents.stop)
        eligible = lengths >= self.min_prefix + self.suffix_len
        self.num_documents = len(doc_ids)
        self.num_skipped_documents = int((~eligible).sum())
        self.doc_ids = doc_ids[eligible]
        self.lengths = lengths[eligible]
        if self.mode == "sliding":
            # One entry per (document, split point) pair.
            counts = (self.lengths - self.min_prefix - self.suffix_len) // self.suffix_len + 1
            self.entry_doc = np.repeat(np.arange(len(self.doc_ids)), counts)
            self.entry_offset = np.concatenate(
                [np.arange(c) * self.suffix_len + self.min_prefix for c in counts] or [[]]
            ).astype(np.int64)
        self._permutation_epoch = -1
        self._permutation = None

    def __len__(self) -> int:
        """Samples per epoch."""
        return len(self.doc_ids) if self.mode == "uniform" else len(self.entry_doc)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._permutation_epoch:
            rng = np.random.default_rng([*self.seed_words, epoch])
            self._permutation = rng.permutation(len(self))
            self._permutation_epoch = epoch
        return self._permutation

    def __getitem__(self, index: int) -> SIPSample:
        if len(self) == 0:
            raise IndexError("no document is long enough for one (prefix, suffix) sample")
        epoch, position = divmod(int(index), len(self))
        entry = int(self._order(epoch)[position])
        if self.mode == "uniform":
            local = entry
            rng = np.random.default_rng([*self.seed_words, epoch, entry])
            last_start = int(self.lengths[local]) - self.suffix_len
            split_point = int(rng.integers(self.min_prefix, last_start + 1))
        else:
            local = int(self.entry_doc[entry])
            split_point = int(self.entry_offset[entry])
        document = int(self.doc_ids[local])
        prefix_start = max(0, split_point - self.max_prefix)
        tokens = self.indexed.get(
            document, offset=prefix_start, length=split_point + self.suffix_len - prefix_start
        ).astype(np.int64)
        cut = split_point - prefix_start
        return SIPSample(
            prefix=tokens[:cut],
            suffix=tokens[cut:],
            dataset=self.dataset_index,
            document=document,
            split_point=split_point,
        )


class SIPDataset:
    """A fixed number of samples drawn from one or more weighted datasets (one split)."""

    def __init__(
        self, sources: Sequence[DocumentSplitPoints], weights: Optional[list[float]], size: int
    ):
        self.sources = list(sources)
        self.size = size
        if len(self.sources) == 1:
            self.dataset_index = np.zeros(size, dtype=np.int16)
            self.dataset_sample_index = np.arange(size, dtype=np.int64)
        else:
            total = float(sum(weights))
            normalised = np.array([w / total for w in weights], dtype=np.float64)
            self.dataset_index = np.zeros(size, dtype=np.int16)
            self.dataset_sample_index = np.zeros(size, dtype=np.int64)
            helpers.build_blending_indices(
                self.dataset_index,
                self.dataset_sample_index,
                normalised,
                len(self.sources),
                size,
                False,
            )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> SIPSample:
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} out of range [0, {self.size})")
        source = self.sources[self.dataset_index[index]]
        return source[int(self.dataset_sample_index[index])]

    @property
    def num_skipped_documents(self) -> int:
        return sum(source.num_skipped_documents for source in self.sources)


def _document_ranges(num_documents: int, split: str) -> list[Optional[range]]:
    """Megatron's split: contiguous document ranges by the normalised proportions."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    ranges = []
    for bounds in matrix:
        if bounds is None:
            ranges.append(None)
            continue
        begin = int(round(bounds[0] * num_documents))
        end = int(round(bounds[1] * num_documents))
        ranges.append(range(begin, end) if end > begin else None)
    return ranges


def build_sip_datasets(
    data: DataConfig,
    sip: SIPDataConfig,
    *,
    seq_length: int,
    seed: int,
    num_samples: Sequence[int],
) -> dict[str, Optional[SIPDataset]]:
    """``{"train", "valid", "test"} -> SIPDataset`` (None for an empty split)."""
    sip.max_prefix_len(seq_length)
    prefixes, weights = data.blend()
    for prefix in prefixes:
        check_indexed_dataset(prefix)  # a missing or damaged file names itself
    indexed = [IndexedDataset(prefix) for prefix in prefixes]
    splits = [_document_ranges(len(ds.document_indices) - 1, data.split) for ds in indexed]
    result: dict[str, Optional[SIPDataset]] = {}
    for split_index, name in enumerate(SPLITS):
        size = num_samples[split_index]
        members = [
            (i, splits[i][split_index]) for i in range(len(indexed)) if splits[i][split_index]
        ]
        if size <= 0 or not members:
            result[name] = None
            continue
        sources = [
            DocumentSplitPoints(indexed[i], docs, sip, seq_length, seed, i, split_index)
            for i, docs in members
        ]
        for (i, _), source in zip(members, sources):
            if len(source) == 0:
                raise ValueError(
                    f"{prefixes[i]}: no {name} document has the --sip-min-prefix-len "
                    f"{sip.sip_min_prefix_len} + --sip-suffix-len {sip.sip_suffix_len} tokens "
                    "one sample needs"
                )
            if source.num_skipped_documents:
                logger.info(
                    "%s (%s): skipped %d of %d documents too short for one sample",
                    prefixes[i],
                    name,
                    source.num_skipped_documents,
                    source.num_documents,
                )
        member_weights = [weights[i] for i, _ in members] if weights else None
        result[name] = SIPDataset(sources, member_weights, size)
    return result


class SIPSampleStream:
    """One data-parallel rank's micro-batches of samples, in Megatron's pretraining order.

    Its state is the number of samples consumed over all ranks; ``load_state_dict`` of a saved
    state continues exactly where the saved stream stopped.
    """

    def __init__(
        self,
        dataset: SIPDataset,
        *,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        consumed_samples: int = 0,
    ):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.consumed_samples = consumed_samples
        self._restart()

    def _restart(self) -> None:
        sampler = OrderedBatchSampler(
            len(self.dataset),
            self.consumed_samples,
            self.micro_batch_size,
            self.data_parallel_rank,
            self.data_parallel_size,
        )
        self._indices = iter(sampler)

    def __iter__(self) -> Iterator[list[SIPSample]]:
        return self

    def __next__(self) -> list[SIPSample]:
        indices = next(self._indices)
        # Every rank reads one micro-batch per data-parallel step: count the whole step.
        self.consumed_samples += self.micro_batch_size * self.data_parallel_size
        return [self.dataset[i] for i in indices]

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "size": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("size") != len(self.dataset):
            raise ValueError(
                f"sample stream state is for {state.get('size')} samples, this dataset has "
                f"{len(self.dataset)}: was it saved with other --train-iters / batch settings?"
            )
        self.consumed_samples = int(state["consumed_samples"])
        self._restart()
