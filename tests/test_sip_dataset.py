"""(prefix, suffix) samples: lengths, truncation, determinism, splits, blends, exact restore."""

from __future__ import annotations

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_sip.data.config import DataConfig
from megatron_sip.data.sip_dataset import SIPDataConfig, SIPSampleStream, build_sip_datasets
from megatron_sip.errors import ConfigError

SUFFIX = 8
SEQ = 24  # prefixes hold at most 16 tokens


def write_dataset(prefix, lengths, base):
    """Document d holds base + d*1000 + [0, 1, 2, ...]: every token says where it came from."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for doc, length in enumerate(lengths):
        builder.add_document(np.arange(length, dtype=np.int32) + base + doc * 1000, [length])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture
def corpora(tmp_path):
    rng = np.random.default_rng(0)
    lengths_a = rng.integers(4, 60, size=40).tolist()  # some shorter than 1 + SUFFIX
    lengths_b = rng.integers(20, 60, size=40).tolist()
    return (
        write_dataset(tmp_path / "a", lengths_a, 0),
        write_dataset(tmp_path / "b", lengths_b, 1_000_000),
        lengths_a,
    )


def build(data_path, sip=None, seed=7, sizes=(200, 20, 0), split="80,20,0"):
    return build_sip_datasets(
        DataConfig(data_path=data_path, split=split),
        sip or SIPDataConfig(sip_suffix_len=SUFFIX),
        seq_length=SEQ,
        seed=seed,
        num_samples=list(sizes),
    )


def check_sample(sample):
    assert len(sample.suffix) == SUFFIX
    assert 1 <= len(sample.prefix) <= SEQ - SUFFIX
    # Contiguous: the prefix ends right where the suffix starts, at the split point.
    tokens = np.concatenate([sample.prefix, sample.suffix])
    assert np.all(np.diff(tokens) == 1)
    offset = sample.suffix[0] - (sample.suffix[0] // 1000) * 1000
    assert offset == sample.split_point
    assert len(sample.prefix) == min(sample.split_point, SEQ - SUFFIX)  # left truncation


def test_samples_are_prefix_and_suffix_of_one_document(corpora):
    a, _, lengths = corpora
    datasets = build([a])
    train = datasets["train"]
    for index in range(len(train)):
        sample = train[index]
        check_sample(sample)
        assert sample.suffix[-1] % 1000 < lengths[sample.document]
    assert datasets["test"] is None
    short = sum(1 for n in lengths[:32] if n < 1 + SUFFIX)
    assert short > 0 and train.num_skipped_documents == short


def test_deterministic_in_seed_and_splits_disjoint(corpora):
    a, _, _ = corpora
    first, again, other = build([a]), build([a]), build([a], seed=8)
    keys = [first["train"][i].key for i in range(50)]
    assert keys == [again["train"][i].key for i in range(50)]
    assert keys != [other["train"][i].key for i in range(50)]
    train_docs = {first["train"][i].document for i in range(200)}
    valid_docs = {first["valid"][i].document for i in range(20)}
    assert train_docs and valid_docs and not train_docs & valid_docs
    assert max(train_docs) < 32 <= min(valid_docs)  # 80% of 40 documents


def test_sliding_split_points_step_by_suffix_len(corpora):
    a, _, lengths = corpora
    train = build([a], SIPDataConfig(sip_suffix_len=SUFFIX, sip_split_point="sliding"))["train"]
    per_epoch = sum((n - 1 - SUFFIX) // SUFFIX + 1 for n in lengths[:32] if n >= 1 + SUFFIX)
    seen = {train[i].key for i in range(per_epoch)}
    assert len(seen) == per_epoch  # one epoch visits every (document, j) once
    assert all((key[2] - 1) % SUFFIX == 0 for key in seen)


def test_blend_follows_weights(corpora):
    a, b, _ = corpora
    train = build(["0.75", a, "0.25", b], sizes=(400, 0, 0))["train"]
    from_b = sum(train[i].dataset for i in range(400))
    assert from_b == 100
    for i in range(0, 400, 7):
        check_sample(train[i])


def test_stream_state_restores_exactly(corpora):
    a, _, _ = corpora
    train = build([a])["train"]
    stream = SIPSampleStream(train, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2)
    for _ in range(5):
        next(stream)
    state = stream.state_dict()
    expected = [[s.key for s in next(stream)] for _ in range(3)]
    resumed = SIPSampleStream(train, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2)
    resumed.load_state_dict(state)
    assert [[s.key for s in next(resumed)] for _ in range(3)] == expected
    # Rank 1 reads the second half of every global batch of 4.
    fresh = SIPSampleStream(train, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2)
    assert [s.key for s in next(fresh)] == [train[2].key, train[3].key]


def test_bad_settings_name_their_flag(corpora):
    a, _, _ = corpora
    with pytest.raises(ConfigError, match="--sip-suffix-len"):
        build([a], SIPDataConfig(sip_suffix_len=SEQ))
    with pytest.raises(ConfigError, match="--sip-split-point"):
        SIPDataConfig(sip_split_point="random")
    with pytest.raises(ConfigError, match="--data-path"):
        DataConfig(data_path=["0.5", a, "0.5"])
    assert IndexedDataset(a).sequence_lengths is not None
