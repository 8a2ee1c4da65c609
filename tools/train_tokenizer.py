"""Trains a SentencePiece tokenizer on jsonl documents; writes PREFIX.model and PREFIX.vocab.

    python tools/train_tokenizer.py --input corpus.jsonl --json-keys text \\
        --vocab-size 32000 --output-prefix tokenizers/sp32k [--model-type bpe|unigram]

Each line of each input is a JSON object; the strings under --json-keys are split into lines and
become SentencePiece's training sentences. The model has fixed special ids: <unk>=0, <s>=1 (BOS),
</s>=2 (EOS, the EOD of GPTSentencePieceTokenizer), <pad>=3. A malformed line stops the run with
FILE:LINE; the model files are written under temporary names and renamed into place only when
training succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


class InputError(ValueError):
    """A bad input line; the message starts with FILE:LINE."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="jsonl files")
    parser.add_argument(
        "--json-keys", nargs="+", default=["text"], metavar="KEY", help="keys holding the text"
    )
    parser.add_argument("--vocab-size", type=int, required=True, help="number of pieces")
    parser.add_argument(
        "--output-prefix", required=True, help="writes OUTPUT_PREFIX.model and .vocab"
    )
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument(
        "--character-coverage",
        type=float,
        default=1.0,
        help="fraction of characters the model covers (1.0 for alphabetic scripts; 0.9995 is "
        "SentencePiece's advice for Chinese or Japanese)",
    )
    parser.add_argument(
        "--byte-fallback",
        action="store_true",
        help="encode characters outside the vocabulary as UTF-8 bytes instead of <unk>",
    )
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=0,
        help="train on a random sample of this many sentences (0: all of them)",
    )
    parser.add_argument(
        "--split-long-lines",
        action="store_true",
        help="cut paragraphs longer than 4192 bytes at sentence ends into several training "
        "lines (SentencePiece skips longer lines: without this flag they are counted and left "
        "out)",
    )
    parser.add_argument(
        "--user-defined-symbols",
        nargs="+",
        default=[],
        metavar="SYMBOL",
        help="strings that always become single tokens (e.g. judge verdicts: [[A]] [[B]])",
    )
    return parser


def write_sentences(paths: list[str], keys: list[str], out, split_long: bool = False) -> int:
    """Writes one training sentence per line to ``out``; returns how many. Paragraphs longer
    than SentencePiece takes are cut at sentence ends with ``split_long``, else counted in
    ``write_sentences.skipped_long`` (SentencePiece leaves them out)."""
    count = 0
    write_sentences.skipped_long = 0
    for path in paths:
        try:
            handle = open(path, "rb")
        except OSError as error:
            raise InputError(f"{path}: cannot read --input: {error.strerror}") from error
        with handle:
            for line_no, raw in enumerate(handle, 1):
                where = f"{path}:{line_no}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise InputError(f"{where}: not UTF-8 ({error.reason})") from error
                if not line.strip():
                    continue
                for text in _texts(line, keys, where):
                    for paragraph in text.splitlines():
                        if not split_long:
                            if len(paragraph.encode("utf-8")) > MAX_LINE_BYTES:
                                write_sentences.skipped_long += 1
                            pieces = [paragraph] if paragraph.strip() else []
                        else:
                            pieces = _pieces(paragraph)
                        for piece in pieces:
                            out.write(piece + "\n")
                            count += 1
    return count


# SentencePiece drops training lines longer than this many bytes (its max_sentence_length).
MAX_LINE_BYTES = 4192


def _pieces(paragraph: str) -> list[str]:
    """The paragraph as training lines short enough for SentencePiece: cut after sentence ends
    (". ") when it is too long, so long documents are learnt from instead of skipped."""
    if not paragraph.strip():
        return []
    if len(paragraph.encode("utf-8")) <= MAX_LINE_BYTES:
        return [paragraph]
    pieces, current = [], ""
    for sentence in paragraph.replace(". ", ".\0").split("\0"):
        if current and len((current + " " + sentence).encode("utf-8")) > MAX_LINE_BYTES:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    # A single "sentence" over the limit is cut at a space (or hard) so nothing is dropped.
    out = []
    for piece in pieces:
        while len(piece.encode("utf-8")) > MAX_LINE_BYTES:
            cut = piece.rfind(" ", 0, MAX_LINE_BYTES // 4)
            cut = cut if cut > 0 else MAX_LINE_BYTES // 4
            out.append(piece[:cut])
            piece = piece[cut:].lstrip()
        if piece.strip():
            out.append(piece)
    return out


def _texts(line: str, keys: list[str], where: str) -> list[str]:
    try:
        document = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: malformed JSON ({error})") from error
    if not isinstance(document, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(document).__name__}")
    texts = []
    for key in keys:
        if key not in document:
            raise InputError(f"{where}: missing key {key!r} (--json-keys)")
        if not isinstance(document[key], str):
            raise InputError(
                f"{where}: {key!r} is {type(document[key]).__name__}, expected a string"
            )
        texts.append(document[key])
    return texts


def train(args: argparse.Namespace) -> None:
    import sentencepiece

    prefix = os.path.abspath(args.output_prefix)
    directory = os.path.dirname(prefix)
    os.makedirs(directory, exist_ok=True)
    # Everything is written inside a temporary directory next to the outputs, so the final
    # rename stays on one file system and a failed run leaves nothing under the final names.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".train_tokenizer.") as work:
        sentences = os.path.join(work, "sentences.txt")
        with open(sentences, "w", encoding="utf-8") as out:
            count = write_sentences(args.input, args.json_keys, out, args.split_long_lines)
        if write_sentences.skipped_long:
            print(
                f"warning: {write_sentences.skipped_long} paragraphs over {MAX_LINE_BYTES} bytes "
                "are left out of training by SentencePiece (--split-long-lines keeps them)",
                file=sys.stderr,
            )
        if count == 0:
            raise InputError(f"{', '.join(args.input)}: no text under --json-keys")
        tmp_prefix = os.path.join(work, "model")
        try:
            sentencepiece.SentencePieceTrainer.train(
                input=sentences,
                model_prefix=tmp_prefix,
                vocab_size=args.vocab_size,
                model_type=args.model_type,
                character_coverage=args.character_coverage,
                byte_fallback=args.byte_fallback,
                input_sentence_size=args.input_sentence_size,
                user_defined_symbols=args.user_defined_symbols or [],
                shuffle_input_sentence=True,
                num_threads=os.cpu_count() or 1,
                minloglevel=1,
                **SPECIAL_IDS,
            )
        except RuntimeError as error:
            message = str(error)
            if "Vocabulary size" in message:
                # "Vocabulary size too high (N). Please set it to a value <= M."
                raise InputError(f"--vocab-size: {message.split('] ')[-1]}") from error
            raise
        for suffix in (".model", ".vocab"):
            os.replace(tmp_prefix + suffix, prefix + suffix)
    print(
        f"trained a {args.model_type} SentencePiece model with {args.vocab_size} pieces on "
        f"{count} sentences: {prefix}.model, {prefix}.vocab"
    )


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.vocab_size <= len(SPECIAL_IDS):
        parser.error(f"--vocab-size: must be larger than {len(SPECIAL_IDS)} (the special pieces)")
    try:
        train(args)
    except InputError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
