"""Tokenizers: SentencePiece (trained here with tools/train_tokenizer.py), Hugging Face
tokenizer.json (trained here with the `tokenizers` library), NullTokenizer; errors name the path
and the flag."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

from megatron_sip.data.config import TokenizerConfig
from megatron_sip.data.tokenizers import (
    HuggingFaceTokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
)
from megatron_sip.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the a quick brown fox jumps over lazy dog cat runs far away from home. Megatron trains "
    "large language models on many GPUs, and the judge scores each rollout!"
).split()
TEXTS = [
    "the quick brown fox jumps over the lazy dog.",
    "Megatron trains models, and the judge scores each rollout!",
    "a cat runs far away from home",
]


def corpus_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))})
        for _ in range(n)
    ]


def train_sentencepiece(
    directory: Path, vocab_size: int = 120, lines=None
) -> subprocess.CompletedProcess:
    corpus = directory / "corpus.jsonl"
    corpus.write_text("\n".join(lines or corpus_lines(300)) + "\n")
    command = [
        sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--input", str(corpus),
        "--json-keys", "text", "--vocab-size", str(vocab_size),
        "--output-prefix", str(directory / "sp"),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sp")
    result = train_sentencepiece(directory)
    assert result.returncode == 0, result.stderr
    assert (directory / "sp.vocab").is_file()
    return directory / "sp.model"


def hf_tokenizer_json(path: Path, special_tokens=("</s>", "<pad>", "<s>")) -> Path:
    """A byte-level BPE tokenizer trained on a few sentences (round-trips any text exactly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([json.loads(line)["text"] for line in corpus_lines(50)], trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def test_sentencepiece_round_trip(sp_model):
    tokenizer = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", str(sp_model)))
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert isinstance(tokenizer, MegatronLegacyTokenizer)
    assert tokenizer.vocab_size == 120
    for text in TEXTS:
        ids = tokenizer.tokenize(text)
        assert ids and all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.detokenize(ids) == text
    # tools/train_tokenizer.py fixes the special ids: <unk>=0, <s>=1, </s>=2 (EOD), <pad>=3.
    assert (tokenizer.eod, tokenizer.bos, tokenizer.pad) == (2, 1, 3)
    assert tokenizer.inv_vocab[tokenizer.eod] == "</s>" and tokenizer.vocab["</s>"] == 2
    assert len(tokenizer.vocab) == tokenizer.vocab_size
    assert tokenizer.eod not in tokenizer.tokenize(" ".join(TEXTS))  # tokenize adds no EOS


def test_sentencepiece_from_directory(sp_model, tmp_path):
    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    tokenizer = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", str(tmp_path)))
    assert tokenizer.tokenize(TEXTS[0]) == SentencePieceTokenizer(str(sp_model)).tokenize(TEXTS[0])


def test_train_tokenizer_bad_line_names_file_and_line(tmp_path):
    lines = corpus_lines(20)
    lines[6] = '{"text": "unterminated'
    result = train_sentencepiece(tmp_path, lines=lines)
    assert result.returncode != 0
    assert f"{tmp_path / 'corpus.jsonl'}:7: malformed JSON" in result.stderr
    assert not list(tmp_path.glob("sp*")) and not list(tmp_path.glob(".train_tokenizer*"))


@pytest.mark.parametrize("from_directory", [False, True])
def test_huggingface_round_trip(tmp_path, from_directory):
    path = hf_tokenizer_json(tmp_path / "hf" / "tokenizer.json")
    config = TokenizerConfig("HuggingFaceTokenizer", str(path.parent if from_directory else path))
    tokenizer = build_tokenizer(config)
    assert isinstance(tokenizer, HuggingFaceTokenizer)
    assert isinstance(tokenizer, MegatronLegacyTokenizer)
    for text in [*TEXTS, "  spaces,\ttabs\nand ünïcode ✓"]:
        ids = tokenizer.tokenize(text)
        assert ids and all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.detokenize(ids) == text
    assert tokenizer.eod == tokenizer.vocab["</s>"] == 0
    assert (tokenizer.pad, tokenizer.bos) == (tokenizer.vocab["<pad>"], tokenizer.vocab["<s>"])
    assert tokenizer.inv_vocab[tokenizer.eod] == "</s>"
    assert tokenizer.vocab_size == len(tokenizer.vocab)
    assert tokenizer.detokenize([*tokenizer.tokenize("dog"), tokenizer.eod]) == "dog</s>"


def test_huggingface_without_end_token_names_the_file(tmp_path):
    path = hf_tokenizer_json(tmp_path / "tokenizer.json", special_tokens=("<pad>",))
    with pytest.raises(ConfigError, match="no end-of-text token") as error:
        build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", str(path)))
    assert str(path) in str(error.value) and error.value.flag == "--tokenizer-model"


def test_null_tokenizer():
    tokenizer = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=100))
    assert isinstance(tokenizer, NullTokenizer)
    assert isinstance(tokenizer, MegatronLegacyTokenizer)
    assert tokenizer.tokenize("5 17  3\n42\t0") == [5, 17, 3, 42, 0]
    assert tokenizer.detokenize([5, 17, 3]) == "5 17 3"
    assert tokenizer.tokenize("") == []
    # vocab_size is --vocab-size itself; EOD is its last id.
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad, tokenizer.bos) == (100, 99, -1, -1)
    assert tokenizer.vocab["42"] == 42 and tokenizer.inv_vocab[99] == "99"
    with pytest.raises(ValueError, match="outside"):
        tokenizer.tokenize("1 100")
    with pytest.raises(ValueError, match="integers"):
        tokenizer.tokenize("1 two")


@pytest.mark.parametrize("tokenizer_type", ["SentencePieceTokenizer", "HuggingFaceTokenizer"])
def test_missing_file_names_path_and_flag(tmp_path, tokenizer_type):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(ConfigError) as error:
        build_tokenizer(TokenizerConfig(tokenizer_type, str(missing)))
    assert str(missing) in str(error.value)
    assert str(error.value).startswith("--tokenizer-model: ")


@pytest.mark.parametrize("tokenizer_type", ["SentencePieceTokenizer", "HuggingFaceTokenizer"])
def test_unreadable_file_names_path_and_flag(tmp_path, tokenizer_type):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00not a tokenizer\xff" * 10)
    with pytest.raises(ConfigError) as error:
        build_tokenizer(TokenizerConfig(tokenizer_type, str(garbage)))
    assert str(garbage) in str(error.value) and error.value.flag == "--tokenizer-model"


def test_train_tokenizer_keeps_long_documents():
    """SentencePiece skips training lines over its byte limit: long paragraphs are cut into
    sentence-aligned lines under it, losing no text."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_tokenizer", Path(__file__).resolve().parents[1] / "tools" / "train_tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paragraph = " ".join(f"Sentence number {i} is about rivers." for i in range(400))
    paragraph += " " + "x" * 9000
    pieces = module._pieces(paragraph)
    assert len(pieces) > 1
    assert all(len(p.encode()) <= module.MAX_LINE_BYTES for p in pieces)
    assert "".join(pieces).replace(" ", "") == paragraph.replace(" ", "")
    assert module._pieces("short one.") == ["short one."] and module._pieces("  ") == []


# ---- continuations: text after a prefix, as the policy sees it ---------------------------------


def _split_inside_a_word(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids of a text cut between two pieces of one word."""
    for text in (" ".join(WORDS), *TEXTS):
        ids = tokenizer.tokenize(text)
        for cut in range(1, len(ids)):
            piece = tokenizer.inv_vocab[ids[cut]]
            if not piece.startswith("\u2581") and piece[:1].isalpha():  # goes on inside a word
                return ids[:cut], ids[cut:]
    raise AssertionError("no word of the test corpus is split into pieces")


def test_rewrite_cut_inside_a_word_is_tokenized_as_the_policy_sees_it(sp_model):
    from megatron_sip.data.tokenizers import decode_continuation, encode_continuation
    from megatron_sip.training.sip.rewrites import encode_rewrite

    tokenizer = SentencePieceTokenizer(str(sp_model))
    prefix, suffix = _split_inside_a_word(tokenizer)
    original = decode_continuation(tokenizer, prefix, suffix)
    # In context the text lines up: prefix text + suffix text is the whole text.
    assert tokenizer.detokenize(prefix) + original == tokenizer.detokenize(prefix + suffix)
    # A rewrite that keeps the word's end and changes what follows.
    rewrite = original.split(" ")[0] + " the lazy dog."
    alone = tokenizer.tokenize(rewrite)
    in_context = encode_rewrite(tokenizer, prefix, original, rewrite, max_tokens=64)
    assert in_context[0] == suffix[0]  # the word goes on with the original's piece...
    assert alone[0] != suffix[0]  # ...which tokenizing the rewrite alone does not give
    assert tokenizer.detokenize(prefix + in_context) == tokenizer.detokenize(prefix) + rewrite
    # A suffix that starts a word keeps its leading space in context, and so does the rewrite
    # of a rewriter that strips its output.
    ids = tokenizer.tokenize(TEXTS[0])
    text = decode_continuation(tokenizer, ids[:3], ids[3:])
    assert text.startswith(" ") and not tokenizer.detokenize(ids[3:]).startswith(" ")
    stripped = encode_rewrite(tokenizer, ids[:3], text, text.strip(), max_tokens=64)
    assert stripped == ids[3:]
    assert encode_continuation(tokenizer, ids[:3], text) == ids[3:]


def test_continuation_keeps_the_context_tokens_when_they_would_merge():
    from megatron_sip.data.tokenizers import encode_continuation

    tokenizer = NullTokenizer(100)
    # "1 2 3" + "4 5" would read 34: the context's tokens stay, the text is tokenized apart.
    assert encode_continuation(tokenizer, [1, 2, 3], "4 5") == [4, 5]
    assert encode_continuation(tokenizer, [1, 2, 3], " 4 5") == [4, 5]
    assert encode_continuation(tokenizer, [], "4 5") == [4, 5]
