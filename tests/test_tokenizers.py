"""Tokenizers with Megatron-LM's names and semantics: SentencePiece types (a model trained here
with tools/train_tokenizer.py), Hugging Face tokenizer.json (trained here with the `tokenizers`
library), GPT-2 BPE and tiktoken files written by hand, NullTokenizer; expected ids are computed
from each tokenizer's documented behaviour; errors name the flag, the file and the fix."""

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
    GPT2BPETokenizer,
    GPTSentencePieceTokenizer,
    HuggingFaceTokenizer,
    Llama2Tokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    TikTokenizer,
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
    tokenizer = build_tokenizer(TokenizerConfig("GPTSentencePieceTokenizer", str(sp_model)))
    assert isinstance(tokenizer, GPTSentencePieceTokenizer)
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
    tokenizer = build_tokenizer(TokenizerConfig("GPTSentencePieceTokenizer", str(tmp_path)))
    expected = GPTSentencePieceTokenizer(str(sp_model)).tokenize(TEXTS[0])
    assert tokenizer.tokenize(TEXTS[0]) == expected


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
    # As Megatron-LM's _NullTokenizer: ids 0..N-1, EOD N, vocabulary N + 1.
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad, tokenizer.bos) == (101, 100, -1, -1)
    assert tokenizer.vocab["42"] == 42 and tokenizer.inv_vocab[100] == "100"
    assert tokenizer.tokenize("1 100") == [1, 100]
    with pytest.raises(ValueError, match="outside"):
        tokenizer.tokenize("1 101")
    with pytest.raises(ValueError, match="integers"):
        tokenizer.tokenize("1 two")


@pytest.mark.parametrize("tokenizer_type", ["GPTSentencePieceTokenizer", "HuggingFaceTokenizer"])
def test_missing_file_names_path_and_flag(tmp_path, tokenizer_type):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(ConfigError) as error:
        build_tokenizer(TokenizerConfig(tokenizer_type, str(missing)))
    assert str(missing) in str(error.value)
    assert str(error.value).startswith("--tokenizer-model: ")


@pytest.mark.parametrize("tokenizer_type", ["GPTSentencePieceTokenizer", "HuggingFaceTokenizer"])
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

    tokenizer = GPTSentencePieceTokenizer(str(sp_model))
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


# ---- Megatron-LM's SentencePiece types ----------------------------------------------------------


def test_sentencepiece_types_as_megatron(sp_model):
    """GPTSentencePieceTokenizer / SentencePieceTokenizer / Llama2Tokenizer on one model: the
    plain ids are the model's; SentencePieceTokenizer adds <CLS> <SEP> <EOD> <MASK> after the
    model's pieces (pad, BOS, EOS exist: <pad> <s> </s>) and the --vocab-extra-ids; with
    --legacy-tokenizer it cuts special-token text out as ids and ends documents with <EOD>, and
    Llama2Tokenizer prepends BOS."""
    import sentencepiece

    model = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    size, text = model.get_piece_size(), "the fox<EOD> runs</s>"
    plain = model.encode(text)

    def build(kind, **kwargs):
        return build_tokenizer(TokenizerConfig(kind, str(sp_model), **kwargs))

    for kind in ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer"):
        tokenizer = build(kind)
        assert tokenizer.tokenize(text) == plain and tokenizer.eod == model.eos_id() == 2
    assert build("Llama2Tokenizer").vocab_size == build("GPTSentencePieceTokenizer").vocab_size

    sp = build("SentencePieceTokenizer", vocab_extra_ids=2)
    added = ["<CLS>", "<SEP>", "<EOD>", "<MASK>", "<extra_id_0>", "<extra_id_1>"]
    assert [sp.vocab[t] for t in added] == list(range(size, size + 6))
    assert sp.vocab_size == size + 6 and (sp.cls, sp.sep, sp.mask) == (size, size + 1, size + 3)
    assert (sp.pad, sp.bos) == (3, 1)

    legacy = build("SentencePieceTokenizer", legacy_tokenizer=True)
    eod = size + 2
    assert (legacy.eod, legacy.eos, legacy.bos, legacy.pad) == (eod, 2, 1, 3)
    assert legacy.tokenize(text) == [*model.encode("the fox"), eod, *model.encode(" runs"), 2]
    assert "<EOD>" in legacy.detokenize(legacy.tokenize(text))

    llama = build("Llama2Tokenizer", legacy_tokenizer=True)
    assert llama.tokenize(text) == [model.bos_id(), *plain] and llama.eod == 2
    assert isinstance(llama, Llama2Tokenizer) and isinstance(sp, SentencePieceTokenizer)


def test_sentencepiece_without_specials_gets_megatron_tokens(tmp_path):
    """A model without pad/BOS/EOS: SentencePieceTokenizer appends <PAD> <BOS> <EOS> too;
    GPTSentencePieceTokenizer has no EOD and says what to do."""
    import sentencepiece

    lines = [json.loads(line)["text"] for line in corpus_lines(200)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "bare"), vocab_size=60,
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2,
    )  # fmt: skip
    path = str(tmp_path / "bare.model")
    tokenizer = SentencePieceTokenizer(path, legacy=True)
    names = ["<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>", "<BOS>", "<EOS>"]
    assert [tokenizer.vocab[t] for t in names] == list(range(60, 67))
    assert (tokenizer.eod, tokenizer.pad, tokenizer.bos, tokenizer.eos) == (62, 64, 65, 66)
    with pytest.raises(ConfigError, match="no EOS piece") as error:
        build_tokenizer(TokenizerConfig("GPTSentencePieceTokenizer", path))
    assert path in str(error.value) and "--legacy-tokenizer" in str(error.value)


# ---- Hugging Face: BOS as Megatron-LM adds it ----------------------------------------------------


def test_huggingface_special_tokens_as_megatron(tmp_path):
    """A Llama-style tokenizer.json whose post-processor prepends <s>, with a
    tokenizer_config.json naming eos/bos: no BOS by default (Megatron-Core's tokenizer), BOS with
    --tokenizer-hf-include-special-tokens or --legacy-tokenizer (Megatron-LM's legacy class);
    eod is the configured eos_token."""
    from tokenizers import Tokenizer, processors

    path = hf_tokenizer_json(tmp_path / "tokenizer.json", ("<|endoftext|>", "</s>", "<s>"))
    tokenizer = Tokenizer.from_file(str(path))
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    tokenizer.save(str(path))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "</s>"}, "bos_token": "<s>"})
    )
    plain = tokenizer.encode(TEXTS[0], add_special_tokens=False).ids
    default = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", str(path)))
    assert default.tokenize(TEXTS[0]) == plain
    assert (default.eod, default.bos) == (tokenizer.token_to_id("</s>"), bos) != (0, bos)
    for flags in ({"tokenizer_hf_include_special_tokens": True}, {"legacy_tokenizer": True}):
        with_bos = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", str(path), **flags))
        assert with_bos.tokenize(TEXTS[0]) == [bos, *plain]


# ---- GPT-2 BPE and tiktoken files written by hand ----------------------------------------------


def gpt2_byte_alphabet() -> list[str]:
    """GPT-2's byte-to-character table, in byte order: printable Latin-1 bytes are themselves,
    the others take the characters from U+0100 on, in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra, table = 0, []
    for byte in range(256):
        if byte in keep:
            table.append(chr(byte))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


def write_gpt2_files(directory: Path) -> tuple[Path, Path]:
    alphabet = gpt2_byte_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = ["l o", "lo w", "\u0120 l", "\u0120 low"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory / "vocab.json", directory / "merges.txt"


def test_gpt2_bpe_as_megatron(tmp_path):
    vocab_file, merge_file = write_gpt2_files(tmp_path)
    vocab = json.loads(vocab_file.read_text())
    tokenizer = build_tokenizer(
        TokenizerConfig("GPT2BPETokenizer", vocab_file=str(vocab_file), merge_file=str(merge_file))
    )
    assert isinstance(tokenizer, GPT2BPETokenizer)
    # "low" -> lo w -> low; " low" -> Ġ lo w -> Ġ low -> Ġlow; " lower" -> Ġlow e r.
    expected = [vocab["low"], vocab["\u0120low"], vocab["\u0120low"], vocab["e"], vocab["r"]]
    assert tokenizer.tokenize("low low lower") == expected
    assert tokenizer.detokenize(expected) == "low low lower"
    assert tokenizer.eod == vocab["<|endoftext|>"] == 260 and tokenizer.vocab_size == 261
    # No special tokens in the text: <|endoftext|> is read as characters.
    assert tokenizer.eod not in tokenizer.tokenize("<|endoftext|>")


def write_tiktoken_file(path: Path, merged=(b"ab", b"abc")) -> Path:
    import base64

    tokens = [bytes([i]) for i in range(256)] + list(merged)
    entries = [
        {"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("latin-1")}
        for i, t in enumerate(tokens)
    ]
    path.write_text(json.dumps(entries))
    return path


def test_tiktoken_as_megatron(tmp_path):
    path = write_tiktoken_file(tmp_path / "tiktoken.json")
    special = 10  # ids 0..9: <unk> <s> </s> <mask> <pad> <cls> <sep> <SPECIAL_7..9>
    config = dict(vocab_size=special + 258, tiktoken_num_special_tokens=special)
    tokenizer = build_tokenizer(TokenizerConfig("TikTokenizer", str(path), **config))
    assert isinstance(tokenizer, TikTokenizer)
    # "abc" -> ab c -> abc (rank 257); " ab" -> " " ab (32, 256); ranks shifted by 10.
    assert tokenizer.tokenize("abc ab") == [257 + special, 32 + special, 256 + special]
    assert tokenizer.detokenize(tokenizer.tokenize("abc ab")) == "abc ab"
    assert (tokenizer.eod, tokenizer.bos, tokenizer.pad, tokenizer.vocab_size) == (2, 1, 4, 268)
    assert tokenizer.tokenize("</s>") == [2]  # Megatron-Core reads special-token text
    legacy = build_tokenizer(
        TokenizerConfig("TikTokenizer", str(path), legacy_tokenizer=True, **config)
    )
    assert legacy.tokenize("</s>") == [special + b for b in b"</s>"]  # the legacy class: bytes
    with pytest.raises(ConfigError, match="at most 268") as error:
        build_tokenizer(TokenizerConfig("TikTokenizer", str(path), tiktoken_num_special_tokens=10))
    assert error.value.flag == "--vocab-size" and str(path) in str(error.value)


# ---- point 8: a tokenizer file of the wrong kind names the flag, the file and the fix ----------


def test_wrong_kind_of_file_names_flag_file_and_fix(tmp_path, sp_model):
    hf = hf_tokenizer_json(tmp_path / "hf" / "tokenizer.json")
    tiktoken_file = write_tiktoken_file(tmp_path / "tiktoken.json")
    vocab_file, merge_file = write_gpt2_files(tmp_path)
    cases = [
        (TokenizerConfig("GPTSentencePieceTokenizer", str(hf)), "--tokenizer-model", hf,
         "use --tokenizer-type HuggingFaceTokenizer"),
        (TokenizerConfig("Llama2Tokenizer", str(tiktoken_file)), "--tokenizer-model",
         tiktoken_file, "use --tokenizer-type TikTokenizer"),
        (TokenizerConfig("HuggingFaceTokenizer", str(sp_model)), "--tokenizer-model", sp_model,
         "GPTSentencePieceTokenizer"),
        (TokenizerConfig("HuggingFaceTokenizer", str(vocab_file)), "--tokenizer-model",
         vocab_file, "GPT2BPETokenizer"),
        (TokenizerConfig("TikTokenizer", str(hf)), "--tokenizer-model", hf,
         "HuggingFaceTokenizer"),
        (TokenizerConfig("TikTokenizer", str(sp_model)), "--tokenizer-model", sp_model,
         "SentencePieceTokenizer"),
        (TokenizerConfig("GPT2BPETokenizer", vocab_file=str(merge_file),
                         merge_file=str(merge_file)), "--vocab-file", merge_file, "--merge-file"),
        (TokenizerConfig("GPT2BPETokenizer", vocab_file=str(vocab_file),
                         merge_file=str(tmp_path / "nowhere.txt")), "--merge-file",
         tmp_path / "nowhere.txt", "never downloaded"),
    ]  # fmt: skip
    for config, flag, path, fix in cases:
        with pytest.raises(ConfigError) as error:
            build_tokenizer(config)
        message = str(error.value)
        assert error.value.flag == flag and str(path) in message and fix in message, message


@pytest.mark.parametrize(
    "kwargs,flag,fragment",
    [
        ({"tokenizer_type": "GPT2BPETokenizer"}, "--vocab-file", "needs --vocab-file"),
        ({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "v.json"}, "--merge-file",
         "needs --vocab-file vocab.json --merge-file"),
        ({"tokenizer_type": "GPT2BPETokenizer", "tokenizer_model": "t"}, "--tokenizer-model",
         "reads --vocab-file and --merge-file"),
        ({"tokenizer_type": "NullTokenizer", "vocab_size": 8, "vocab_file": "v"}, "--vocab-file",
         "only for GPT2BPETokenizer"),
        ({"tokenizer_type": "TikTokenizer"}, "--tokenizer-model", "needs --tokenizer-model"),
        ({"tokenizer_type": "Llama2Tokenizer", "tokenizer_model": "m", "vocab_size": 8},
         "--vocab-size", "only for NullTokenizer and TikTokenizer"),
        ({"tokenizer_type": "NullTokenizer", "vocab_size": 8, "vocab_extra_ids": 2},
         "--vocab-extra-ids", "only for SentencePieceTokenizer"),
        ({"tokenizer_type": "NullTokenizer", "vocab_size": 8, "tiktoken_pattern": "v1"},
         "--tiktoken-pattern", "only for TikTokenizer"),
        ({"tokenizer_type": "GPTSentencePieceTokenizer", "tokenizer_model": "m",
          "tokenizer_hf_include_special_tokens": True}, "--tokenizer-hf-include-special-tokens",
         "only for HuggingFaceTokenizer"),
        ({"tokenizer_type": "TikTokenizer", "tokenizer_model": "m", "tiktoken_pattern": "v3"},
         "--tiktoken-pattern", "unknown value 'v3'"),
    ],
)  # fmt: skip
def test_tokenizer_flags_are_checked(kwargs, flag, fragment):
    with pytest.raises(ConfigError) as error:
        TokenizerConfig(**kwargs)
    assert error.value.flag == flag and fragment in str(error.value)
