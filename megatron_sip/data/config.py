"""Tokenizer settings (the tokenizers themselves live in ``tokenizers.py``)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from megatron_sip.errors import ConfigError, require_choice

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")


@dataclasses.dataclass
class TokenizerConfig:
    """Which tokenizer turns text into token ids."""

    tokenizer_type: Literal["SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"] = (
        "NullTokenizer"
    )
    """Tokenizer implementation. NullTokenizer maps integers to themselves (tests, synthetic
    data) and needs --vocab-size."""

    tokenizer_model: Optional[str] = None
    """Path of the tokenizer on disk: a SentencePiece `.model` file, or a Hugging Face
    `tokenizer.json` or its directory."""

    vocab_size: Optional[int] = None
    """Vocabulary size for NullTokenizer (other tokenizers know their own)."""

    make_vocab_size_divisible_by: int = 128
    """Pad the embedding table to a multiple of this times the tensor-parallel size."""

    def __post_init__(self):
        require_choice("--tokenizer-type", self.tokenizer_type, TOKENIZER_TYPES)
        if self.tokenizer_type == "NullTokenizer" and not self.vocab_size:
            raise ConfigError("--vocab-size", "NullTokenizer needs --vocab-size N (N > 0)")
        if self.tokenizer_type != "NullTokenizer" and not self.tokenizer_model:
            raise ConfigError(
                "--tokenizer-model", f"{self.tokenizer_type} needs --tokenizer-model PATH"
            )


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's embedding padding: a multiple of ``divisible_by * TP``."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple
