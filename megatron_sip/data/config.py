"""Tokenizer settings (the tokenizers themselves live in ``tokenizers.py``)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_sip.errors import ConfigError, require_choice

TOKENIZER_TYPES = (
    "GPTSentencePieceTokenizer",
    "SentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "TikTokenizer",
    "NullTokenizer",
)
"""Megatron-LM's ``--tokenizer-type`` names this project implements, with Megatron-LM's semantics
(``megatron/training/tokenizer/tokenizer.py`` and ``megatron.core.tokenizers`` at core_v0.16.1).
Megatron-LM's BERT, multimodal and SFT tokenizers are not offered."""

_MODEL_FILE_TYPES = (
    "GPTSentencePieceTokenizer",
    "SentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
    "TikTokenizer",
)


@dataclasses.dataclass
class TokenizerConfig:
    """Which tokenizer turns text into token ids (Megatron-LM's tokenizer flags)."""

    tokenizer_type: Optional[str] = dataclasses.field(
        default=None, metadata={"choices": lambda: TOKENIZER_TYPES}
    )
    """Tokenizer implementation, by Megatron-LM's name. GPTSentencePieceTokenizer: a plain
    SentencePiece model, EOD = its EOS. SentencePieceTokenizer: SentencePiece plus Megatron's added
    <CLS> <SEP> <EOD> <MASK> (and <PAD> <BOS> <EOS> when the model has none) and --vocab-extra-ids.
    Llama2Tokenizer: SentencePiece, EOD = EOS, BOS prepended with --legacy-tokenizer.
    HuggingFaceTokenizer: a local tokenizer.json. GPT2BPETokenizer: --vocab-file and --merge-file.
    TikTokenizer: a tiktoken JSON vocabulary. NullTokenizer: text is integer ids, vocabulary
    --vocab-size + 1 with EOD = --vocab-size. Default: GPT2BPETokenizer when --vocab-file and
    --merge-file are given (Megatron-LM's GPT-3 example passes only those; Megatron-LM itself then
    stops at "None tokenizer is not implemented"), NullTokenizer when --vocab-size is."""

    tokenizer_model: Optional[str] = None
    """Tokenizer file on disk: a SentencePiece `.model`, a Hugging Face `tokenizer.json` (or its
    directory), or a tiktoken vocabulary `.json`. Never downloaded."""

    vocab_file: Optional[str] = None
    """GPT2BPETokenizer: the BPE vocabulary (`vocab.json`)."""

    merge_file: Optional[str] = None
    """GPT2BPETokenizer: the BPE merges (`merges.txt`)."""

    vocab_size: Optional[int] = None
    """NullTokenizer: ids 0..N-1 plus EOD = N (vocabulary N + 1, as Megatron-LM). TikTokenizer:
    the vocabulary size including the special tokens (default 131072)."""

    vocab_extra_ids: int = 0
    """SentencePieceTokenizer: add this many <extra_id_i> tokens (T5 sentinels)."""

    legacy_tokenizer: bool = False
    """Tokenize as Megatron-LM's legacy tokenizer classes (megatron/training/tokenizer) instead of
    Megatron-Core's tokenizers (Megatron-LM 0.16's default in preprocess_data.py and GPTDataset):
    SentencePieceTokenizer splits out its special tokens and ends documents with <EOD>,
    Llama2Tokenizer prepends BOS, HuggingFaceTokenizer adds its special tokens (BOS), TikTokenizer
    reads special-token text as plain text."""

    tokenizer_hf_include_special_tokens: bool = False
    """HuggingFaceTokenizer: add the tokenizer's special tokens (its post-processor's BOS/EOS) to
    every text, as Megatron-Core's HuggingFace tokenizer does with this flag."""

    tiktoken_pattern: Optional[str] = dataclasses.field(
        default=None, metadata={"choices": lambda: ("v1", "v2")}
    )
    """TikTokenizer: the pre-tokenization regex, v1 or v2 (Megatron-Core's default: v2)."""

    tiktoken_num_special_tokens: int = 1000
    """TikTokenizer: ids reserved for special tokens before the vocabulary's own."""

    tiktoken_special_tokens: Optional[list[str]] = None
    """TikTokenizer: the special tokens, first ids first; must include <unk> <s> </s> <mask>
    <pad> <cls> <sep> (default: exactly those). Deprecated alias of --tokenizer-special-tokens."""

    tokenizer_special_tokens: Optional[list[str]] = None
    """TikTokenizer: the special tokens (see --tiktoken-special-tokens)."""

    make_vocab_size_divisible_by: int = 128
    """Pad the embedding table to a multiple of this times the tensor-parallel size."""

    model_vocab_size: Optional[int] = None
    """Rows of the embedding table and output layer before that padding (default: the
    tokenizer's vocabulary size). A model imported from Hugging Face keeps its config's
    vocab_size, which can exceed its tokenizer's (Qwen2.5: 151936 rows for 151665 tokens); never
    smaller than the tokenizer's vocabulary."""

    def __post_init__(self):
        if self.tokenizer_type is None:
            self.tokenizer_type = self._implied_type()
        require_choice("--tokenizer-type", self.tokenizer_type, TOKENIZER_TYPES)
        kind = self.tokenizer_type
        if kind == "NullTokenizer" and not (self.vocab_size and self.vocab_size > 0):
            raise ConfigError("--vocab-size", "NullTokenizer needs --vocab-size N (N > 0)")
        if kind in _MODEL_FILE_TYPES and not self.tokenizer_model:
            raise ConfigError("--tokenizer-model", f"{kind} needs --tokenizer-model PATH")
        if kind not in _MODEL_FILE_TYPES and self.tokenizer_model:
            reads = (
                " (it reads --vocab-file and --merge-file)" if kind == "GPT2BPETokenizer" else ""
            )
            raise ConfigError(
                "--tokenizer-model", f"{kind} reads no --tokenizer-model{reads}; drop it"
            )
        bpe_files = {"--vocab-file": self.vocab_file, "--merge-file": self.merge_file}
        for flag, value in bpe_files.items():
            if kind == "GPT2BPETokenizer" and not value:
                raise ConfigError(
                    flag, f"{kind} needs --vocab-file vocab.json --merge-file merges.txt"
                )
            if kind != "GPT2BPETokenizer" and value:
                raise ConfigError(flag, f"only for GPT2BPETokenizer, not {kind}; drop it")
        if self.vocab_size is not None and kind not in ("NullTokenizer", "TikTokenizer"):
            raise ConfigError(
                "--vocab-size",
                f"only for NullTokenizer and TikTokenizer: {kind} reads its vocabulary from its "
                "files",
            )
        if self.vocab_extra_ids < 0 or (self.vocab_extra_ids and kind != "SentencePieceTokenizer"):
            raise ConfigError(
                "--vocab-extra-ids", f"a count >= 0, only for SentencePieceTokenizer (not {kind})"
            )
        if self.tokenizer_hf_include_special_tokens and kind != "HuggingFaceTokenizer":
            flag = "--tokenizer-hf-include-special-tokens"
            raise ConfigError(flag, f"only for HuggingFaceTokenizer, not {kind}")
        tiktoken_flags = {
            "--tiktoken-pattern": self.tiktoken_pattern is not None,
            "--tiktoken-num-special-tokens": self.tiktoken_num_special_tokens != 1000,
            "--tiktoken-special-tokens": self.tiktoken_special_tokens is not None,
            "--tokenizer-special-tokens": self.tokenizer_special_tokens is not None,
        }
        for flag, is_set in tiktoken_flags.items():
            if is_set and kind != "TikTokenizer":
                raise ConfigError(flag, f"only for TikTokenizer, not {kind}")
        if self.model_vocab_size is not None and self.model_vocab_size <= 0:
            raise ConfigError(
                "--model-vocab-size", f"must be positive, got {self.model_vocab_size}"
            )
        if self.tiktoken_pattern is not None:
            require_choice("--tiktoken-pattern", self.tiktoken_pattern, ("v1", "v2"))
        if self.tiktoken_special_tokens and self.tokenizer_special_tokens:
            raise ConfigError(
                "--tiktoken-special-tokens", "give --tokenizer-special-tokens only (its new name)"
            )

    def _implied_type(self) -> str:
        """The one tokenizer type the given files fit, when --tokenizer-type is not given."""
        if self.vocab_file and self.merge_file:
            return "GPT2BPETokenizer"
        if self.vocab_size and not (self.tokenizer_model or self.vocab_file or self.merge_file):
            return "NullTokenizer"
        raise ConfigError(
            "--tokenizer-type",
            "required: name the tokenizer (" + ", ".join(TOKENIZER_TYPES) + ")",
        )


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's embedding padding: a multiple of ``divisible_by * TP``."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def embedding_vocab_size(
    config: TokenizerConfig, tokenizer_vocab_size: int, tensor_parallel_size: int
) -> int:
    """Rows of the model's embedding table and output layer on all tensor-parallel ranks:
    --model-vocab-size (default: the tokenizer's ``tokenizer_vocab_size``) padded to
    --make-vocab-size-divisible-by x TP."""
    rows = config.model_vocab_size or tokenizer_vocab_size
    if rows < tokenizer_vocab_size:
        raise ConfigError(
            "--model-vocab-size",
            f"{rows} is smaller than the tokenizer's vocabulary ({tokenizer_vocab_size} ids); "
            "the embedding needs a row for every id",
        )
    return padded_vocab_size(rows, config.make_vocab_size_divisible_by, tensor_parallel_size)


DATALOADER_TYPES = ("single", "cyclic", "external")


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

    mock_data: bool = False
    """Train on Megatron-Core's MockGPTDataset (synthetic token sequences from the tokenizer's
    vocabulary) instead of --data-path: for smoke and throughput runs. Megatron-Core splits mock
    data evenly into train/validation/test."""

    mmap_bin_files: bool = True
    """Memory-map the `.bin` files (`--no-mmap-bin-files` reads them with file reads instead)."""

    create_attention_mask_in_dataloader: bool = True
    """Build each sample's causal attention mask in the dataset and pass it to the model
    (`--no-create-attention-mask-in-dataloader`: the attention layer makes the causal mask)."""

    dataloader_type: Optional[str] = dataclasses.field(
        default=None, metadata={"choices": lambda: DATALOADER_TYPES}
    )
    """Megatron-LM's data loader kind. Only `single` (one pass over the samples in Megatron's
    fixed order, resumable from the consumed-sample count) is implemented; the default."""

    def __post_init__(self):
        if self.data_path is not None:
            self.blend()  # validates the weights / prefixes pairing
        if self.mock_data and self.data_path:
            # As Megatron-LM: a single data source.
            raise ConfigError("--mock-data", "give --mock-data or --data-path, not both")
        if self.dataloader_type is not None:
            require_choice("--dataloader-type", self.dataloader_type, DATALOADER_TYPES)
            if self.dataloader_type != "single":
                raise ConfigError(
                    "--dataloader-type",
                    f"{self.dataloader_type} is not implemented here: training reads each sample "
                    "once, in Megatron's fixed and resumable order (single); use single",
                )
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
