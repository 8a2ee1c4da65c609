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
        "sp": ["--tokenizer-type", "GPTSentencePieceTokenizer",
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
        # As Megatron-LM: every document is tokenized (whitespace too); one with tokens is one
        # sequence (then EOD), one without is a document without sequences.
        per_doc = [tokenizer.tokenize(doc[key]) for doc in docs]
        expected = [ids + [tokenizer.eod] if append_eod else ids for ids in per_doc if ids]
        dataset = IndexedDataset(str(tmp_path / "out" / f"corpus_{key}_document"))
        assert dataset.index.dtype == np.uint16  # vocabularies below 65500 ids
        assert len(dataset) == len(expected) and len(dataset.document_indices) == len(docs) + 1
        assert dataset.document_indices.tolist() == [0, *np.cumsum([bool(i) for i in per_doc])]
        assert dataset.sequence_lengths.tolist() == [len(ids) for ids in expected]
        for i, ids in enumerate(expected):
            assert dataset[i].tolist() == ids
        empty = len(per_doc) - len(expected)
        assert empty == (
            1 if key == "text" and tokenizer.tokenize("  \n ") else 2 * (key == "text")
        )
        assert f"{len(docs):,} documents, {sum(map(len, expected)):,} tokens" in result.stdout
        assert f"{empty} of them empty" in result.stdout
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
        "",  # a blank line is no document
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
    assert "1 of them empty" in result.stdout and "skipped 1 blank lines" in result.stdout
    for line_no, message in [
        (2, "malformed JSON"),
        (3, "missing key 'text'"),
        (4, "value of 'text' is int, expected a string"),
        (8, "cannot tokenize 'text': NullTokenizer id 999 is outside [0, 65)"),
    ]:
        assert f"skipping {corpus}:{line_no}: {message}" in result.stderr
    dataset = IndexedDataset(str(tmp_path / "corpus_text_document"))
    # --vocab-size 64: EOD is 64; the empty document has no sequence.
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        [1, 2, 3, 64],
        [4, 5, 64],
        [8, 64],
    ]
    assert dataset.document_indices.tolist() == [0, 1, 1, 2, 3]


def read_back(prefix: Path) -> tuple[list[list[int]], list[int]]:
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))], dataset.document_indices.tolist()


def test_megatron_layout_partitions_and_sentences(tmp_path):
    """Megatron-LM's layout, expected by hand (NullTokenizer --vocab-size 50: EOD 50): a list
    value is one sequence per sentence with EOD in the last; --partitions 2 deals lines
    round-robin (0, 2, 4 then 1, 3), --keep-sequential-samples keeps the input order, which is
    byte for byte the output of one partition."""
    lines = [{"text": "1 2"}, {"text": ["3", "4 5"]}, {"text": ""}, {"text": "6"}, {"text": "7 8"}]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", lines)
    common = ["--input", corpus, "--tokenizer-type", "NullTokenizer", "--vocab-size", 50,
              "--append-eod", "--log-interval", 2]  # fmt: skip
    runs = {
        "one": [],
        "sequential": ["--partitions", 2, "--keep-sequential-samples"],
        "dealt": ["--partitions", 2],
    }
    for name, flags in runs.items():
        result = preprocess(*common, "--output-prefix", tmp_path / name, *flags)
        assert result.returncode == 0, result.stderr
        assert "Processed 4 documents (" in result.stderr  # --log-interval 2
    in_order = [[1, 2, 50], [3], [4, 5, 50], [6, 50], [7, 8, 50]]
    assert read_back(tmp_path / "one_text_document") == (in_order, [0, 1, 3, 3, 4, 5])
    for ext in (".bin", ".idx"):
        one = (tmp_path / f"one_text_document{ext}").read_bytes()
        assert (tmp_path / f"sequential_text_document{ext}").read_bytes() == one
    dealt = [[1, 2, 50], [7, 8, 50], [3], [4, 5, 50], [6, 50]]  # lines 1, 3, 5, then 2, 4
    assert read_back(tmp_path / "dealt_text_document") == (dealt, [0, 1, 1, 2, 4, 5])


def test_llama2_legacy_puts_bos_first_and_eod_last(tmp_path, tokenizer_flags):
    """Llama2Tokenizer --legacy-tokenizer: each document is BOS, the model's ids, EOD (= EOS)."""
    import sentencepiece

    model_path = tokenizer_flags["sp"][3]
    model = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    docs = documents(6)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    result = preprocess(
        "--input", corpus, "--output-prefix", tmp_path / "llama", "--append-eod",
        "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", model_path,
        "--legacy-tokenizer",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = [[model.bos_id(), *model.encode(d["text"]), model.eos_id()] for d in docs]
    assert read_back(tmp_path / "llama_text_document")[0] == expected


def test_split_sentences(tmp_path):
    """--split-sentences: one sequence per sentence, EOD in the document's last, written as
    OUTPUT_PREFIX_KEY_sentence; without NLTK's punkt data it is refused with the fix."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "preprocess_tool", ROOT / "tools/preprocess_data.py"
    )
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # its dataclasses look their module up
    try:
        spec.loader.exec_module(tool)
    finally:
        del sys.modules[spec.name]

    class PeriodSplitter:  # stands in for punkt: sentences end at ". "
        def tokenize(self, text):
            return [s + "." if not s.endswith(".") else s for s in text.split(". ") if s]

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "1 2. 3. 4 5"}, {"text": "6"}])
    flags = ["--input", str(corpus), "--output-prefix", str(tmp_path / "s"), "--split-sentences",
             "--append-eod", "--tokenizer-type", "NullTokenizer", "--vocab-size", "9"]  # fmt: skip
    args = tool.build_parser().parse_args(flags)
    config = tool.config_from_namespace(TokenizerConfig, args)

    class Ids(PeriodSplitter):  # NullTokenizer reads integers: drop the periods
        def tokenize(self, text):
            return [s.rstrip(".") for s in super().tokenize(text)]

    tool.preprocess(args, config, splitter=Ids())
    assert read_back(tmp_path / "s_text_sentence") == ([[1, 2], [3], [4, 5, 9], [6, 9]], [0, 3, 4])
    assert not (tmp_path / "s_text_document.bin").exists()
    if importlib.util.find_spec("nltk") is None:
        result = preprocess(*flags)
        assert result.returncode == 2
        assert "--split-sentences: needs the nltk package" in result.stderr
        assert "pip install nltk" in result.stderr and "Traceback" not in result.stderr
