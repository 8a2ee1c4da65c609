"""Tokenizes jsonl documents into Megatron indexed datasets (Megatron-LM's preprocess_data.py).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \\
        --json-keys text --append-eod --workers 8

Each line of --input is one JSON object (one document). For every key in --json-keys the tool
writes OUTPUT_PREFIX_KEY_document.bin / .idx, one sequence per document, readable by
Megatron-Core's IndexedDataset / GPTDataset (pass OUTPUT_PREFIX_KEY_document to --data-path).
Token ids are stored as uint16 below 65500 ids, int32 above (as Megatron-LM).

A malformed line, a missing key, a non-string value or text the tokenizer rejects (NullTokenizer:
a non-integer or an id outside the vocabulary) stops the run with FILE:LINE (exit code 1) unless
--skip-invalid, which skips such lines and reports how many. Documents with no text (empty or
whitespace only, and blank lines) are skipped and counted. Outputs are written under temporary
names next to the final ones and renamed into place only when the whole run succeeded: a failed
run leaves earlier outputs untouched.
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

from megatron_sip.arguments import add_config_arguments, config_from_namespace
from megatron_sip.data.config import TokenizerConfig
from megatron_sip.data.tokenizers import build_tokenizer
from megatron_sip.errors import ConfigError

MAX_REPORTED_SKIPS = 10


class InputError(ValueError):
    """Bad input that stops the run; the message names the file (and line)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
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
    """Consecutive lines of one input file."""

    path: str
    first_line: int  # 1-based number of lines[0]
    lines: list[bytes]

    @property
    def num_bytes(self) -> int:
        return sum(len(line) for line in self.lines)


class Encoder:
    """Turns a line into {key: token ids, or None for an empty document}, or an error string.

    The tokenizer is built on first use, in the process that uses it (each worker its own)."""

    def __init__(self, config: TokenizerConfig, keys: list[str], append_eod: bool, tokenizer=None):
        self.config, self.keys, self.append_eod = config, keys, append_eod
        self._tokenizer = tokenizer

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.config)
        return self._tokenizer

    def encode_line(self, raw: bytes) -> dict[str, np.ndarray | None] | str:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            return f"not UTF-8 ({error.reason} at byte {error.start})"
        if not line.strip():
            return dict.fromkeys(self.keys)  # a blank line: an empty document
        try:
            document = json.loads(line)
        except json.JSONDecodeError as error:
            return f"malformed JSON ({error})"
        if not isinstance(document, dict):
            return f"expected a JSON object, got {type(document).__name__}"
        encoded: dict[str, np.ndarray | None] = {}
        for key in self.keys:
            if key not in document:
                return f"missing key {key!r} (--json-keys)"
            text = document[key]
            if not isinstance(text, str):
                return f"value of {key!r} is {type(text).__name__}, expected a string"
            try:
                ids = self.tokenizer.tokenize(text) if text.strip() else []
            except ValueError as error:  # e.g. NullTokenizer given a non-integer
                return f"cannot tokenize {key!r}: {error}"
            if not ids:
                encoded[key] = None
                continue
            if self.append_eod:
                ids = [*ids, self.tokenizer.eod]
            encoded[key] = np.asarray(ids, dtype=np.int32)
        return encoded

    def encode_chunk(self, chunk: Chunk) -> list[dict[str, np.ndarray | None] | str]:
        return [self.encode_line(raw) for raw in chunk.lines]


_worker_encoder: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(chunk: Chunk):
    return _worker_encoder.encode_chunk(chunk)


def read_chunks(paths: list[str], chunk_size: int) -> Iterator[Chunk]:
    for path in paths:
        with open(path, "rb") as handle:
            lines: list[bytes] = []
            first = 1
            for line_no, raw in enumerate(handle, 1):
                lines.append(raw)
                if len(lines) == chunk_size:
                    yield Chunk(path, first, lines)
                    lines, first = [], line_no + 1
            if lines:
                yield Chunk(path, first, lines)


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

    final: str  # OUTPUT_PREFIX_KEY_document
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

    def add(self, ids: np.ndarray) -> None:
        self.builder.add_item(torch.from_numpy(ids))
        self.builder.end_document()
        self.documents += 1
        self.tokens += len(ids)

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


def preprocess(args: argparse.Namespace, config: TokenizerConfig) -> None:
    for path in args.input:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise InputError(f"{path}: --input file not found or not readable")
    tokenizer = build_tokenizer(config)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefix = os.path.abspath(args.output_prefix)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    outputs = {key: Output(f"{prefix}_{key}_document", dtype) for key in args.json_keys}
    encoder = Encoder(config, args.json_keys, args.append_eod, tokenizer)
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
        chunks = read_chunks(args.input, args.chunk_size)
        read = 0
        for chunk, results in encoded_chunks(chunks, encoder, pool, args.workers):
            for offset, result in enumerate(results):
                if isinstance(result, str):
                    where = f"{chunk.path}:{chunk.first_line + offset}"
                    if not args.skip_invalid:
                        raise InputError(f"{where}: {result}; fix it or pass --skip-invalid")
                    invalid += 1
                    if invalid <= MAX_REPORTED_SKIPS:
                        tqdm.write(f"skipping {where}: {result}", file=sys.stderr)
                    continue
                read += 1
                for key, ids in result.items():
                    if ids is None:
                        outputs[key].empty += 1
                    else:
                        outputs[key].add(ids)
            progress.update(chunk.num_bytes)
            progress.set_postfix(documents=read, refresh=False)
        progress.close()
        for key, output in outputs.items():
            if output.documents == 0:
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
            f"{output.empty:,} empty documents skipped"
        )
    tokens = sum(output.tokens for output in outputs.values())
    line = (
        f"processed {read:,} documents, {tokens:,} tokens in {elapsed:.2f} s: "
        f"{read / elapsed:,.1f} documents/s, {tokens / elapsed:,.0f} tokens/s"
    )
    if args.skip_invalid:
        line += f"; skipped {invalid:,} invalid lines"
    print(line, flush=True)


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers: must be at least 1, got {args.workers}")
    if args.chunk_size < 1:
        parser.error(f"--chunk-size: must be at least 1, got {args.chunk_size}")
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
