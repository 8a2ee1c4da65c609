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
        if self.tokenizer_type != "NullTokenizer" and self.vocab_size is not None:
            raise ConfigError(
                "--vocab-size",
                f"only for NullTokenizer: {self.tokenizer_type} reads its vocabulary from "
                "--tokenizer-model",
            )
        if self.tokenizer_type == "NullTokenizer" and self.tokenizer_model:
            raise ConfigError("--tokenizer-model", "NullTokenizer reads no model; drop it")


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's embedding padding: a multiple of ``divisible_by * TP``."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


@dataclasses.dataclass
class DataConfig:
    """Which indexed datasets are read and how they are split."""

    data_path: Optional[list[str]] = None
    """Indexed dataset prefixes (`.bin`/`.idx` without the suffix), optionally weighted as in
    Megatron-LM: `--data-path PREFIX` or `--data-path 0.7 PREFIX_A 0.3 PREFIX_B`."""

    split: str = "969,30,1"
    """Train/validation/test proportions of every dataset, e.g. `98,2,0`."""

    data_cache_path: Optional[str] = None
    """Directory for the sample index caches. Default: `cache/` beside the first dataset."""

    num_workers: int = 0
    """DataLoader worker processes per rank."""

    def __post_init__(self):
        if self.data_path is not None:
            self.blend()  # validates the weights / prefixes pairing
        parts = self.split.replace("/", ",").split(",")
        try:
            values = [float(part) for part in parts]
        except ValueError:
            raise ConfigError(
                "--split", f"expected numbers like 98,2,0, got {self.split!r}"
            ) from None
        if len(values) > 3 or any(v < 0 for v in values) or sum(values) <= 0:
            raise ConfigError(
                "--split", f"expected up to 3 non-negative numbers, got {self.split!r}"
            )

    def blend(self) -> tuple[list[str], Optional[list[float]]]:
        """(prefixes, weights or None) as Megatron's dataset builder takes them."""
        items = list(self.data_path or [])
        if not items:
            raise ConfigError("--data-path", "needs at least one dataset prefix")
        if len(items) == 1:
            return items, None
        if len(items) % 2:
            raise ConfigError(
                "--data-path", "with several datasets give weight-prefix pairs: 0.7 A 0.3 B"
            )
        try:
            weights = [float(w) for w in items[0::2]]
        except ValueError:
            raise ConfigError(
                "--data-path", "with several datasets give weight-prefix pairs: 0.7 A 0.3 B"
            ) from None
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError("--data-path", f"weights must be non-negative, got {weights}")
        return items[1::2], weights
