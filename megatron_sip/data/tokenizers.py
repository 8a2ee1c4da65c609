"""Tokenizers that Megatron-Core's datasets accept.

:func:`build_tokenizer` turns a :class:`~megatron_sip.data.config.TokenizerConfig` into one of three
tokenizers. Each subclasses Megatron-Core's ``MegatronLegacyTokenizer`` (the interface
``GPTDataset`` reads: ``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``) and offers

- ``tokenize(text) -> list[int]`` and ``detokenize(ids) -> str``; no BOS/EOS is added by
  ``tokenize`` (``tools/preprocess_data.py --append-eod`` appends ``eod`` per document);
- ``vocab_size``: the number of ids, before Megatron's padding for tensor parallelism
  (:func:`~megatron_sip.data.config.padded_vocab_size` does that);
- ``eod`` (also ``eos``), ``pad``, ``bos``: special ids, ``-1`` where the tokenizer has none
  (SentencePiece's and Megatron's convention: ``GPTDataset`` treats a pad of ``-1`` as "none");
- ``vocab`` (token -> id) and ``inv_vocab`` (id -> token).

Every tokenizer reads from local disk only; a missing or unreadable file raises
:class:`~megatron_sip.errors.ConfigError` naming the path and ``--tokenizer-model``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Sequence

from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

from megatron_sip.data.config import TokenizerConfig
from megatron_sip.errors import ConfigError

__all__ = [
    "HuggingFaceTokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "build_tokenizer",
]

# End-of-text tokens, in order of preference, for tokenizers that do not name one explicitly.
EOD_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
NO_TOKEN = -1


class _DropLegacyWarning(logging.Filter):
    """``MegatronLegacyTokenizer.__init__`` warns that the legacy tokenizer system is deprecated.
    Megatron-Core 0.16's ``GPTDataset`` still consumes exactly this interface, so the warning
    (printed once per process, i.e. once per preprocessing worker) is not actionable here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("You're using the legacy tokenizer system")


logging.getLogger("megatron.core.datasets.megatron_tokenizer").addFilter(_DropLegacyWarning())


def build_tokenizer(config: TokenizerConfig) -> MegatronLegacyTokenizer:
    """The tokenizer ``config.tokenizer_type`` names, loaded from ``config.tokenizer_model``."""
    if config.tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(config.tokenizer_model)
    if config.tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(config.tokenizer_model)
    if config.tokenizer_type == "NullTokenizer":
        return NullTokenizer(config.vocab_size)
    # TokenizerConfig validates the type; this guards configs built with dataclasses.replace.
    raise ConfigError("--tokenizer-type", f"unknown tokenizer type {config.tokenizer_type!r}")


def _ids(ids: Iterable[int]) -> list[int]:
    """Plain Python ints from a list, tensor or numpy array."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


def _resolve(path: str | None, kind: str, default_name: str) -> str:
    """The file to load: ``path`` itself, or ``path/default_name`` when ``path`` is a directory."""
    if not path:
        raise ConfigError("--tokenizer-model", f"{kind} needs --tokenizer-model PATH")
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        inner = os.path.join(path, default_name)
        if not os.path.isfile(inner):
            raise ConfigError(
                "--tokenizer-model",
                f"{path} is a directory without a {default_name}; pass the {kind} file itself",
            )
        return inner
    if not os.path.exists(path):
        raise ConfigError(
            "--tokenizer-model",
            f"{kind} file {path} not found; pass a local path (tokenizers are never downloaded)",
        )
    if not os.access(path, os.R_OK):
        raise ConfigError("--tokenizer-model", f"{kind} file {path} is not readable")
    return path


def _first_present(vocab: dict[str, int], candidates: Sequence[str]) -> int:
    for token in candidates:
        if token in vocab:
            return vocab[token]
    return NO_TOKEN


class _Tokenizer(MegatronLegacyTokenizer):
    """Shared properties: subclasses set ``_vocab_size``, ``_eod``, ``_pad``, ``_bos``."""

    _vocab_size: int
    _eod: int
    _pad: int = NO_TOKEN
    _bos: int = NO_TOKEN

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def inv_vocab(self) -> dict[int, str]:
        return self._inv_vocab

    @functools.cached_property
    def _inv_vocab(self) -> dict[int, str]:
        return {i: token for token, i in self.vocab.items()}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod}, "
            f"pad={self.pad}, bos={self.bos})"
        )


class SentencePieceTokenizer(_Tokenizer):
    """A SentencePiece ``.model`` file (or a directory holding ``tokenizer.model``).

    ``eod`` is the model's EOS id (``</s>`` in models from ``tools/train_tokenizer.py``, Llama 2
    and most others). A model trained with ``--eos_id=-1`` has none; then the first piece named
    like an end-of-text token (``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>``) is
    used, since some models declare their end token as a user-defined piece instead. A model with
    neither cannot separate documents, so loading it fails (GPTDataset needs ``eod``).
    ``pad`` and ``bos`` are the model's ids (``-1`` when disabled).
    """

    def __init__(self, model_path: str | None):
        import sentencepiece

        path = _resolve(model_path, "SentencePiece model", "tokenizer.model")
        super().__init__(path)
        self.model_path = path
        try:
            self._model = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as error:  # sentencepiece raises RuntimeError/OSError
            raise ConfigError(
                "--tokenizer-model", f"cannot read SentencePiece model {path}: {error}"
            ) from error
        self._vocab_size = self._model.get_piece_size()
        self._pad = self._model.pad_id()
        self._bos = self._model.bos_id()
        eod = self._model.eos_id()
        if eod == NO_TOKEN:
            # piece_to_id answers unk_id for an unknown piece: keep only exact matches.
            pieces = {p: self._model.piece_to_id(p) for p in EOD_TOKENS}
            eod = _first_present(
                {p: i for p, i in pieces.items() if self._model.id_to_piece(i) == p}, EOD_TOKENS
            )
        if eod == NO_TOKEN:
            raise ConfigError(
                "--tokenizer-model",
                f"SentencePiece model {path} has no end-of-sequence piece (eos_id=-1 and none "
                f"of {', '.join(EOD_TOKENS)}); retrain it with an eos id "
                "(tools/train_tokenizer.py does)",
            )
        self._eod = eod

    def tokenize(self, text: str) -> list[int]:
        return self._model.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._model.decode(_ids(ids))

    @functools.cached_property
    def vocab(self) -> dict[str, int]:
        return {self._model.id_to_piece(i): i for i in range(self._vocab_size)}


class HuggingFaceTokenizer(_Tokenizer):
    """A Hugging Face ``tokenizer.json`` (or a directory holding one), read with the
    ``tokenizers`` library; never downloaded from the hub.

    ``tokenize`` adds no special tokens (no BOS; ``--append-eod`` adds the EOD), so every
    tokenizer type produces the same document layout. ``eod`` is the first of
    ``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>`` in the vocabulary (loading fails
    if there is none). ``pad`` is the tokenizer's padding id if it sets one, else the first of
    ``<pad>``, ``<|pad|>``, ``[PAD]``, ``<|padding|>``; ``bos`` the first of
    ``<|begin_of_text|>``, ``<s>``, ``<bos>``, ``<|startoftext|>``; ``-1`` when absent.
    ``vocab_size`` covers every id, added tokens included.
    """

    def __init__(self, path: str | None):
        import tokenizers

        file = _resolve(path, "Hugging Face tokenizer.json", "tokenizer.json")
        super().__init__(file)
        self.tokenizer_file = file
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(file)
        except Exception as error:  # tokenizers raises a bare Exception on a bad file
            raise ConfigError(
                "--tokenizer-model", f"cannot read Hugging Face tokenizer {file}: {error}"
            ) from error
        vocab = self.vocab
        # Ids can have holes (added tokens placed at the end of a reserved range): count to the
        # largest id so that every id has an embedding row.
        self._vocab_size = max(
            self._tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1
        )
        self._eod = _first_present(vocab, EOD_TOKENS)
        if self._eod == NO_TOKEN:
            raise ConfigError(
                "--tokenizer-model",
                f"Hugging Face tokenizer {file} has no end-of-text token (none of "
                f"{', '.join(EOD_TOKENS)}); add one as a special token",
            )
        padding = self._tokenizer.padding
        self._pad = padding["pad_id"] if padding else _first_present(vocab, PAD_TOKENS)
        self._bos = _first_present(vocab, BOS_TOKENS)

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(_ids(ids), skip_special_tokens=False)

    @functools.cached_property
    def vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)


class NullTokenizer(_Tokenizer):
    """Text is whitespace-separated integer ids, each in ``[0, vocab_size)``; ``detokenize``
    joins ids with single spaces (Megatron's NullTokenizer convention).

    ``vocab_size`` is ``--vocab-size`` itself and ``eod`` is its last id, ``vocab_size - 1``, so the
    model's vocabulary (built from ``--vocab-size``) covers every id including EOD; keep data ids
    below ``vocab_size - 1`` if EOD must stay distinct. (Megatron-LM's ``_NullTokenizer`` instead
    reports ``vocab_size + 1`` and uses ``vocab_size`` as EOD.) There is no ``pad`` or ``bos``
    (``-1``).
    """

    def __init__(self, vocab_size: int | None):
        if vocab_size is None or int(vocab_size) <= 0:
            raise ConfigError(
                "--vocab-size", f"NullTokenizer needs --vocab-size N > 0, got {vocab_size!r}"
            )
        super().__init__(vocab_size=int(vocab_size))
        self._vocab_size = int(vocab_size)
        self._eod = self._vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            try:
                i = int(word)
            except ValueError:
                raise ValueError(
                    f"NullTokenizer reads whitespace-separated integers, got {word[:40]!r}"
                ) from None
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"NullTokenizer id {i} is outside [0, {self._vocab_size})")
            ids.append(i)
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(i) for i in _ids(ids))

    @functools.cached_property
    def vocab(self) -> dict[str, int]:
        return {str(i): i for i in range(self._vocab_size)}


# --------------------------------------------------------------------------------------------
# continuations: text after given tokens, as the model sees it
# --------------------------------------------------------------------------------------------

CONTEXT_TOKENS = 8
"""Tokens of the preceding text used to decode or encode a continuation in context."""

# Anchors that end a word and rarely merge with what follows, for a continuation whose first
# characters merge with the context's last token (see :func:`encode_continuation`).
_ANCHORS = (".", ",", ";", ")", "\n")


def decode_continuation(tokenizer, context: Sequence[int], ids: Sequence[int]) -> str:
    """The text ``ids`` add after the tokens ``context``: ``detokenize(context + ids)`` minus
    ``detokenize(context)``. Decoding ``ids`` alone loses what depends on the context: a
    SentencePiece model drops the leading space of a continuation that starts a new word, so
    prefix and continuation texts would run together. Falls back to decoding ``ids`` alone when
    the texts do not line up (a multi-byte character split across the boundary)."""
    context = _ids(context)[-CONTEXT_TOKENS:]
    ids = _ids(ids)
    if not context:
        return tokenizer.detokenize(ids)
    before = tokenizer.detokenize(context)
    together = tokenizer.detokenize(context + ids)
    if together.startswith(before):
        return together[len(before) :]
    return tokenizer.detokenize(ids)


def encode_continuation(tokenizer, context: Sequence[int], text: str) -> list[int]:
    """The tokens a model sees for ``text`` after the tokens ``context`` (the policy's prefix):
    ``text`` is tokenized together with the context's last tokens, and the tokens after the
    context's own are kept. Tokenizing ``text`` alone differs at its start: a SentencePiece
    model adds a word-start marker to a continuation that goes on inside a word (a suffix cut
    mid-word), and BPE merges depend on the neighbouring characters.

    The context tokens stay fixed. When the text's first characters would merge with the
    context's last token into one token, no tokenization keeps the context intact and also
    matches the joint one; the text is then tokenized after a word-ending anchor (``.``, ``,``
    ...), which leaves its start as it is."""
    context = _ids(context)[-CONTEXT_TOKENS:]
    for anchor in ([tokenizer.detokenize(context)] if context else []) + list(_ANCHORS):
        try:
            before = tokenizer.tokenize(anchor)
            together = tokenizer.tokenize(anchor + text)
        except ValueError:  # an anchor the tokenizer cannot read (NullTokenizer: integers only)
            continue
        if together[: len(before)] == before:
            return together[len(before) :]
    return tokenizer.tokenize(text)
