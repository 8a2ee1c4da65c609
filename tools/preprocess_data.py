"""Tokenizes jsonl documents into Megatron indexed datasets (Megatron-LM's preprocess_data.py).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model \\
        --json-keys text --append-eod --workers 8

Each line of --input is one JSON object (one document). For every key in --json-keys the tool
writes OUTPUT_PREFIX_KEY_document.bin / .idx (OUTPUT_PREFIX_KEY_sentence with --split-sentences),
readable by Megatron-Core's IndexedDataset / GPTDataset (pass the prefix to --data-path). The
output is what Megatron-LM's tools/preprocess_data.py writes for the same input and tokenizer flags:
the same token ids (the tokenizer's, then its EOD with --append-eod), one sequence per document, or
per sentence with --split-sentences (NLTK's punkt) or when the value is a list of strings, empty
documents kept as documents without sequences, ids as uint16 below 65500 ids, int32 above.

A malformed line, a missing key, a value that is not a string (or list of strings) or text the
tokenizer rejects (NullTokenizer: a non-integer or an id outside the vocabulary) stops the run
with FILE:LINE (exit code 1) unless --skip-invalid, which skips such lines and reports how many;
blank lines are skipped. Outputs are written under temporary names next to the final ones and
renamed into place only when the whole run succeeded: a failed run leaves earlier outputs
untouched. Unlike Megatron-LM, --partitions writes no partition files: it only orders the
documents as Megatron-LM's partitioned run does.
"""

# ruff: noqa: E402
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

# Megatron-Core says at import time that Transformer Engine and Apex are missing; tokenizing needs
# neither, and the notice would bury the progress bar and errors. (Hence the E402s below.)
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from megatron_sip.arguments import FlagsFileParser, add_config_arguments, config_from_namespace
from megatron_sip.data.config import TokenizerConfig
from megatron_sip.data.tokenizers import build_tokenizer
from megatron_sip.errors import ConfigError

MAX_REPORTED_SKIPS = 10


class InputError(ValueError):
    """Bad input that stops the run; the message names the file (and line)."""


def build_parser() -> argparse.ArgumentParser:
    parser = FlagsFileParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        fromfile_prefix_chars="@",  # e.g. an imported model's tokenizer.args
    )
    group = parser.add_argument_group("input and output")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help="jsonl file(s), one JSON document per line; several are concatenated in order",
    )
    group.add_argument(
        "--output-prefix",
        required=True,
        help="writes OUTPUT_PREFIX_KEY_document.bin/.idx for each --json-keys KEY",
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        metavar="KEY",
        help="keys of the documents to tokenize, one dataset each (default: text)",
    )
    group.add_argument(
        "--append-eod", action="store_true", help="append the tokenizer's EOD id to each document"
    )
    group.add_argument(
        "--split-sentences",
        action="store_true",
        help="one sequence per sentence (NLTK's punkt, whose data must be installed locally); "
        "writes OUTPUT_PREFIX_KEY_sentence",
    )
    group.add_argument(
        "--keep-newlines",
        action="store_true",
        help="with --split-sentences: keep the newlines after sentences in the sentences",
    )
    group.add_argument(
        "--lang", default="english", help="punkt language for --split-sentences (default: english)"
    )
    group.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip malformed lines, missing keys and non-string values (and report how many) "
        "instead of stopping at the first one",
    )
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--workers", type=int, default=1, help="tokenizer processes (default: 1, in-process)"
    )
    group.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="order documents as Megatron-LM's run with this many input partitions: line i goes "
        "to partition i mod N (contiguous blocks with --keep-sequential-samples), partitions "
        "concatenated in order (default: 1, input order)",
    )
    group.add_argument(
        "--keep-sequential-samples",
        action="store_true",
        help="with --partitions: partitions are contiguous blocks of lines, so the output keeps "
        "the input order",
    )
    group.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        help="print a progress line every this many documents (default: 1000)",
    )
    group.add_argument(
        "--chunk-size",
        type=int,
        default=256,
        help="documents per task sent to a worker (default: 256)",
    )
    add_config_arguments(parser, TokenizerConfig, "tokenizer")
    return parser


# --------------------------------------------------------------------------------------------
# encoding (runs in the workers)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """Lines of one input file, in output order."""

    path: str
    line_numbers: list[int]  # 1-based, one per line
    lines: list[bytes]

    @property
    def num_bytes(self) -> int:
        return sum(len(line) for line in self.lines)


# Megatron-LM hands punkt at most this many characters of a text at a time.
SPLIT_WINDOW = 1_000_000


def sentence_splitter(lang: str, keep_newlines: bool):
    """NLTK's punkt sentence splitter for ``lang``, from the NLTK data installed on this machine
    (``$NLTK_DATA`` or NLTK's default paths; nothing is downloaded). With ``keep_newlines`` the
    whitespace after a sentence (its newlines) stays at the sentence's end, as Megatron-LM's
    ``--keep-newlines``."""
    try:
        import nltk
        from nltk.tokenize import punkt
    except ImportError as error:
        raise ConfigError(
            "--split-sentences",
            f"needs the nltk package and its punkt data ({error}): pip install nltk, then "
            "python -m nltk.downloader punkt_tab (or copy the data to $NLTK_DATA)",
        ) from error
    try:
        if hasattr(punkt, "PunktTokenizer"):  # nltk >= 3.8.2: the pickle-free punkt_tab data
            splitter = punkt.PunktTokenizer(lang)
        else:  # pragma: no cover - older nltk reads the pickled punkt data, as Megatron-LM
            splitter = nltk.data.load(f"tokenizers/punkt/{lang}.pickle")
    except (LookupError, OSError, ValueError) as error:
        raise ConfigError(
            "--split-sentences",
            f"NLTK's punkt data for --lang {lang} is not installed on this machine (nothing is "
            "downloaded): run python -m nltk.downloader punkt_tab where there is network access "
            "and copy nltk_data to $NLTK_DATA here",
        ) from error
    if not keep_newlines:
        return splitter

    class KeepWhitespace(punkt.PunktLanguageVars):
        # Punkt's own period context with the whitespace after a sentence end matched as part
        # of the sentence (\s* where punkt has \s+), and the next token taken as any
        # non-space run: a sentence keeps the newlines that follow it.
        _period_context_fmt = r"""
            \S*
            %(SentEndChars)s
            \s*
            (?=(?P<after_tok>
                %(NonWord)s
                |
                (?P<next_tok>\S+)
            ))"""

    return punkt.PunktSentenceTokenizer(train_text=splitter._params, lang_vars=KeepWhitespace())


class Encoder:
    """Turns a line into {key: (token ids, sentence lengths)}, or an error string. A document's
    ids are its sentences' ids concatenated (then EOD with ``append_eod``, counted in the last
    sentence); a document without tokens has no sentences.

    The tokenizer (and sentence splitter) is built on first use, in the process that uses it
    (each worker its own)."""

    def __init__(
        self,
        config: TokenizerConfig,
        keys: list[str],
        append_eod: bool,
        tokenizer=None,
        split_sentences: bool = False,
        keep_newlines: bool = False,
        lang: str = "english",
        splitter=None,
    ):
        self.config, self.keys, self.append_eod = config, keys, append_eod
        self.split_sentences, self.keep_newlines, self.lang = split_sentences, keep_newlines, lang
        self._tokenizer = tokenizer
        self._splitter = splitter

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None, "_splitter": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.config)
        return self._tokenizer

    @property
    def splitter(self):
        if self._splitter is None:
            self._splitter = sentence_splitter(self.lang, self.keep_newlines)
        return self._splitter

    def sentences(self, text: str | list[str]) -> list[str]:
        if isinstance(text, list):  # already split, as Megatron-LM's sentence-split files
            return text
        if not self.split_sentences:
            return [text]
        return [
            sentence
            for start in range(0, len(text), SPLIT_WINDOW)
            for sentence in self.splitter.tokenize(text[start : start + SPLIT_WINDOW])
        ]

    def encode_line(self, raw: bytes) -> dict[str, tuple[np.ndarray, list[int]]] | str | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            return f"not UTF-8 ({error.reason} at byte {error.start})"
        if not line.strip():
            return None  # a blank line: no document
        try:
            document = json.loads(line)
        except json.JSONDecodeError as error:
            return f"malformed JSON ({error})"
        if not isinstance(document, dict):
            return f"expected a JSON object, got {type(document).__name__}"
        encoded = {}
        for key in self.keys:
            if key not in document:
                return f"missing key {key!r} (--json-keys)"
            text = document[key]
            if not (
                isinstance(text, str)
                or (isinstance(text, list) and all(isinstance(t, str) for t in text))
            ):
                return f"value of {key!r} is {type(text).__name__}, expected a string"
            ids: list[int] = []
            lengths: list[int] = []
            try:
                for sentence in self.sentences(text):
                    sentence_ids = self.tokenizer.tokenize(sentence)
                    if sentence_ids:
                        ids += sentence_ids
                        lengths.append(len(sentence_ids))
            except ValueError as error:  # e.g. NullTokenizer given a non-integer
                return f"cannot tokenize {key!r}: {error}"
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod)
                lengths[-1] += 1
            encoded[key] = (np.asarray(ids, dtype=np.int64), lengths)
        return encoded

    def encode_chunk(self, chunk: Chunk) -> list:
        return [self.encode_line(raw) for raw in chunk.lines]


_worker_encoder: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(chunk: Chunk):
    return _worker_encoder.encode_chunk(chunk)


def count_lines(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            total += sum(1 for _ in handle)
    return total


def read_chunks(
    paths: list[str], chunk_size: int, partitions: int = 1, sequential: bool = False
) -> Iterator[Chunk]:
    """The input lines in output order: Megatron-LM's ``--partitions N`` deals line ``i`` (over
    all inputs) to partition ``i mod N``, or with ``--keep-sequential-samples`` to contiguous
    blocks of ``ceil(lines / N)``, and concatenates the partitions' outputs in order."""
    if partitions > 1 and sequential:
        partitions = 1  # contiguous blocks, concatenated in order: the input order
    for partition in range(partitions):
        index = 0
        for path in paths:
            with open(path, "rb") as handle:
                numbers: list[int] = []
                lines: list[bytes] = []
                for line_no, raw in enumerate(handle, 1):
                    mine = index % partitions == partition
                    index += 1
                    if not mine:
                        continue
                    numbers.append(line_no)
                    lines.append(raw)
                    if len(lines) == chunk_size:
                        yield Chunk(path, numbers, lines)
                        numbers, lines = [], []
                if lines:
                    yield Chunk(path, numbers, lines)


def encoded_chunks(
    chunks: Iterator[Chunk], encoder: Encoder, pool, workers: int
) -> Iterator[tuple[Chunk, list]]:
    """Encoded chunks in input order. With a pool, at most 4 tasks per worker are in flight, so
    memory stays bounded however far reading runs ahead of tokenizing."""
    if pool is None:
        for chunk in chunks:
            yield chunk, encoder.encode_chunk(chunk)
        return
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append((chunk, pool.apply_async(_encode_in_worker, (chunk,))))
        if len(pending) >= 4 * workers:
            chunk, result = pending.popleft()
            yield chunk, result.get()
    while pending:
        chunk, result = pending.popleft()
        yield chunk, result.get()


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


@dataclass
class Output:
    """One key's dataset: written to ``*.tmp-PID`` files, renamed to ``final`` on success."""

    final: str  # OUTPUT_PREFIX_KEY_document (or _sentence)
    dtype: type
    documents: int = 0
    tokens: int = 0
    empty: int = 0
    builder: IndexedDatasetBuilder | None = field(default=None, repr=False)

    @property
    def temporary(self) -> dict[str, str]:
        return {ext: f"{self.final}{ext}.tmp-{os.getpid()}" for ext in (".bin", ".idx")}

    def open(self) -> None:
        self.builder = IndexedDatasetBuilder(self.temporary[".bin"], dtype=self.dtype)

    def add(self, ids: np.ndarray, lengths: list[int]) -> None:
        """One document: its sequences (sentences), or none for a document without tokens
        (kept as an empty document, as Megatron-LM writes it)."""
        self.builder.add_document(torch.from_numpy(ids), lengths)
        self.documents += 1
        self.tokens += len(ids)
        self.empty += not lengths

    def finalize(self) -> None:
        """Writes the index and flushes both files to disk, still under temporary names."""
        self.builder.finalize(self.temporary[".idx"])
        for path in self.temporary.values():
            _fsync(path)

    def publish(self) -> None:
        for ext, path in self.temporary.items():
            os.replace(path, self.final + ext)

    def discard(self) -> None:
        if self.builder is not None:
            self.builder.data_file.close()
        for path in self.temporary.values():
            if os.path.exists(path):
                os.remove(path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def preprocess(args: argparse.Namespace, config: TokenizerConfig, splitter=None) -> None:
    """Tokenizes ``args.input`` into the outputs; ``splitter`` (an object with
    ``tokenize(text) -> sentences``) replaces punkt for --split-sentences."""
    for path in args.input:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise InputError(f"{path}: --input file not found or not readable")
    tokenizer = build_tokenizer(config)
    if args.split_sentences and splitter is None:
        splitter = sentence_splitter(args.lang, args.keep_newlines)  # fails here, not in workers
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefix = os.path.abspath(args.output_prefix)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    level = "sentence" if args.split_sentences else "document"
    outputs = {key: Output(f"{prefix}_{key}_{level}", dtype) for key in args.json_keys}
    encoder = Encoder(
        config,
        args.json_keys,
        args.append_eod,
        tokenizer,
        split_sentences=args.split_sentences,
        keep_newlines=args.keep_newlines,
        lang=args.lang,
        splitter=splitter,
    )
    invalid = 0
    start = time.perf_counter()
    pool = None
    progress = tqdm(
        total=sum(os.path.getsize(p) for p in args.input),
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        file=sys.stderr,
        mininterval=0.5,
    )
    try:
        for output in outputs.values():
            output.open()
        if args.workers > 1:
            pool = multiprocessing.Pool(args.workers, initializer=_init_worker, initargs=(encoder,))
        chunks = read_chunks(
            args.input, args.chunk_size, args.partitions, args.keep_sequential_samples
        )
        read = blank = 0
        log_start, log_bytes = time.perf_counter(), 0
        for chunk, results in encoded_chunks(chunks, encoder, pool, args.workers):
            for line_no, result in zip(chunk.line_numbers, results):
                if result is None:
                    blank += 1
                    continue
                if isinstance(result, str):
                    where = f"{chunk.path}:{line_no}"
                    if not args.skip_invalid:
                        raise InputError(f"{where}: {result}; fix it or pass --skip-invalid")
                    invalid += 1
                    if invalid <= MAX_REPORTED_SKIPS:
                        tqdm.write(f"skipping {where}: {result}", file=sys.stderr)
                    continue
                read += 1
                for key, (ids, lengths) in result.items():
                    outputs[key].add(ids, lengths)
                if read % args.log_interval == 0:  # Megatron-LM's progress line
                    elapsed = max(time.perf_counter() - log_start, 1e-9)
                    tqdm.write(
                        f"Processed {read} documents ({read / elapsed:.1f} docs/s, "
                        f"{log_bytes / elapsed / 2**20:.2f} MB/s).",
                        file=sys.stderr,
                    )
            log_bytes += chunk.num_bytes
            progress.update(chunk.num_bytes)
            progress.set_postfix(documents=read, refresh=False)
        progress.close()
        for key, output in outputs.items():
            if output.documents == output.empty:
                raise InputError(
                    f"{', '.join(args.input)}: no document has text under {key!r} "
                    f"({output.empty} empty, {invalid} invalid); nothing was written"
                )
        # Every dataset is complete on disk before the first rename.
        for output in outputs.values():
            output.finalize()
        for output in outputs.values():
            output.publish()
        _fsync(os.path.dirname(prefix))
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        for output in outputs.values():
            output.discard()
    elapsed = max(time.perf_counter() - start, 1e-9)
    for output in outputs.values():
        print(
            f"wrote {output.final}.bin/.idx: {output.documents:,} documents, "
            f"{output.tokens:,} tokens ({np.dtype(dtype).name}), "
            f"{output.empty:,} of them empty"
        )
    tokens = sum(output.tokens for output in outputs.values())
    line = (
        f"processed {read:,} documents, {tokens:,} tokens in {elapsed:.2f} s: "
        f"{read / elapsed:,.1f} documents/s, {tokens / elapsed:,.0f} tokens/s"
    )
    if args.skip_invalid:
        line += f"; skipped {invalid:,} invalid lines"
    if blank:
        line += f"; skipped {blank:,} blank lines"
    print(line, flush=True)


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers: must be at least 1, got {args.workers}")
    if args.chunk_size < 1:
        parser.error(f"--chunk-size: must be at least 1, got {args.chunk_size}")
    if args.partitions < 1:
        parser.error(f"--partitions: must be at least 1, got {args.partitions}")
    if args.log_interval < 1:
        parser.error(f"--log-interval: must be at least 1, got {args.log_interval}")
    if args.keep_newlines and not args.split_sentences:
        parser.error("--keep-newlines: only with --split-sentences (it keeps newlines in them)")
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys: repeated key in {args.json_keys}")
    try:
        config = config_from_namespace(TokenizerConfig, args)
        preprocess(args, config)
    except ConfigError as error:
        parser.error(str(error))
    except InputError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
