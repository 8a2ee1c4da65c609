"""tools/preprocess_data.py: what IndexedDataset reads back is the tokenizer's output, document by
document; bad lines name FILE:LINE and leave no (and replace no) outputs."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_sip.data.config import TokenizerConfig
from megatron_sip.data.tokenizers import build_tokenizer

from .test_tokenizers import WORDS, hf_tokenizer_json, train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
EMPTY_LINES = (4, 11)  # 1-based lines whose "text" is empty / whitespace only


def documents(n: int = 24, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for line_no in range(1, n + 1):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        if line_no in EMPTY_LINES:
            text = "" if line_no == EMPTY_LINES[0] else "  \n "
        title = f"Title {line_no}: {rng.choice(WORDS)}"
        docs.append({"id": line_no, "text": text, "title": title})
    return docs


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def preprocess(*flags) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "tools/preprocess_data.py"), *map(str, flags)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tokenizer_flags(tmp_path_factory) -> dict[str, list[str]]:
    directory = tmp_path_factory.mktemp("tokenizers")
    result = train_sentencepiece(directory)
    assert result.returncode == 0, result.stderr
    hf = hf_tokenizer_json(directory / "hf" / "tokenizer.json")
    return {
        "sp": ["--tokenizer-type", "SentencePieceTokenizer",
               "--tokenizer-model", directory / "sp.model"],
        "hf": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf.parent],
    }  # fmt: skip


def config_from_flags(flags) -> TokenizerConfig:
    return TokenizerConfig(tokenizer_type=flags[1], tokenizer_model=str(flags[3]))


@pytest.mark.parametrize(
    "tokenizer,append_eod,workers", [("sp", True, 2), ("sp", False, 1), ("hf", True, 2)]
)
def test_round_trip(tmp_path, tokenizer_flags, tokenizer, append_eod, workers):
    docs = documents()
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    flags = tokenizer_flags[tokenizer]
    result = preprocess(
        "--input", corpus, "--output-prefix", tmp_path / "out" / "corpus",
        "--json-keys", "text", "title", "--workers", workers, "--chunk-size", 5, *flags,
        *(["--append-eod"] if append_eod else []),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tokenizer = build_tokenizer(config_from_flags(flags))

    total_tokens = 0
    for key in ("text", "title"):
        expected = []
        for doc in docs:
            ids = tokenizer.tokenize(doc[key]) if doc[key].strip() else []
            if ids:
                expected.append(ids + [tokenizer.eod] if append_eod else ids)
        dataset = IndexedDataset(str(tmp_path / "out" / f"corpus_{key}_document"))
        assert dataset.index.dtype == np.uint16  # vocabularies below 65500 ids
        # One sequence per document, in input order; empty documents skipped.
        assert (
            len(dataset) == len(expected) == len(docs) - (len(EMPTY_LINES) if key == "text" else 0)
        )
        assert dataset.document_indices.tolist() == list(range(len(expected) + 1))
        assert dataset.sequence_lengths.tolist() == [len(ids) for ids in expected]
        for i, ids in enumerate(expected):
            assert dataset[i].tolist() == ids
        empty = len(EMPTY_LINES) if key == "text" else 0
        assert f"{len(expected):,} documents, {sum(map(len, expected)):,} tokens" in result.stdout
        assert f"{empty} empty documents skipped" in result.stdout
        total_tokens += sum(map(len, expected))

    summary = re.search(
        r"processed (\d+) documents, ([\d,]+) tokens in .* documents/s, .* tokens/s", result.stdout
    )
    assert summary, result.stdout
    assert int(summary[1]) == len(docs) and int(summary[2].replace(",", "")) == total_tokens
    assert "tokenizing" in result.stderr  # the progress bar
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "corpus_text_document.bin", "corpus_text_document.idx",
        "corpus_title_document.bin", "corpus_title_document.idx",
    ]  # fmt: skip
    if append_eod:
        check_gpt_dataset(tmp_path / "out" / "corpus_text_document", tokenizer)


def check_gpt_dataset(prefix: Path, tokenizer) -> None:
    """Megatron-Core's GPTDataset reads the output with our tokenizer (vocab_size, eod, pad)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=1, sequence_length=16, blend=([str(prefix)], None), split="100,0,0",
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, path_to_cache=None,
    )  # fmt: skip
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [8, None, None], lambda: True, config)
    train = builder.build()[0]
    samples = [train[i] for i in range(len(train))]
    assert all(sample["tokens"].shape == (16,) for sample in samples)
    assert any((sample["tokens"] == tokenizer.eod).any() for sample in samples)
    # The pad id never occurs in the data, so no real token loses its loss.
    assert all(sample["loss_mask"].all() for sample in samples)


def write_good_output(prefix: Path) -> dict[Path, bytes]:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for ids in ([1, 2, 3], [4, 5]):
        builder.add_item(torch.tensor(ids))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return {path: path.read_bytes() for path in (Path(f"{prefix}.bin"), Path(f"{prefix}.idx"))}


def test_bad_line_stops_with_file_and_line(tmp_path):
    lines = [{"text": f"{i} {i + 1}"} for i in range(12)]
    lines[8] = '{"text": "1 2 3", '  # line 9: malformed
    corpus = write_jsonl(tmp_path / "corpus.jsonl", lines)
    good = write_good_output(tmp_path / "corpus_text_document")
    result = preprocess(
        "--input", corpus, "--output-prefix", tmp_path / "corpus", "--workers", 2,
        "--chunk-size", 2, "--tokenizer-type", "NullTokenizer", "--vocab-size", 64,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"{corpus}:9: malformed JSON" in result.stderr
    assert "--skip-invalid" in result.stderr
    # Nothing new on disk, and the earlier good output is untouched.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["corpus.jsonl", *(path.name for path in good)]
    )
    for path, content in good.items():
        assert path.read_bytes() == content
    # (Keep the dataset referenced while reading: its items are views of its memory map.)
    dataset = IndexedDataset(str(tmp_path / "corpus_text_document"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [[1, 2, 3], [4, 5]]


def test_skip_invalid_skips_and_counts(tmp_path):
    lines = [
        {"text": "1 2 3"},
        "{not json",
        {"other": "7"},
        {"text": 7},
        {"text": ""},
        {"text": "4 5"},
        "",  # a blank line is an empty document
        {"text": "6 999"},  # outside the vocabulary
        {"text": "8"},
    ]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", lines)
    result = preprocess(
        "--input", corpus, "--output-prefix", tmp_path / "corpus", "--skip-invalid",
        "--append-eod", "--tokenizer-type", "NullTokenizer", "--vocab-size", 64,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "skipped 4 invalid lines" in result.stdout
    assert "2 empty documents skipped" in result.stdout
    for line_no, message in [
        (2, "malformed JSON"),
        (3, "missing key 'text'"),
        (4, "value of 'text' is int, expected a string"),
        (8, "cannot tokenize 'text': NullTokenizer id 999 is outside [0, 64)"),
    ]:
        assert f"skipping {corpus}:{line_no}: {message}" in result.stderr
    dataset = IndexedDataset(str(tmp_path / "corpus_text_document"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        [1, 2, 3, 63],
        [4, 5, 63],
        [8, 63],
    ]
