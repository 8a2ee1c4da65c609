"""Tokenizers with Megatron-LM's ``--tokenizer-type`` names and semantics.

:func:`build_tokenizer` turns a :class:`~megatron_sip.data.config.TokenizerConfig` into one of
Megatron-LM's tokenizer types. Megatron-LM 0.16 has two tokenizer systems and this module follows
both as Megatron-LM combines them:

- token ids (``tokenize``, ``eod``, ``bos``, ``pad``) are those of Megatron-Core's tokenizers
  (``megatron.core.tokenizers``), which Megatron-LM's ``tools/preprocess_data.py`` and
  ``pretrain_gpt.py``'s ``GPTDataset`` use by default; with ``--legacy-tokenizer`` they are those
  of Megatron-LM's legacy classes (``megatron/training/tokenizer/tokenizer.py``);
- ``vocab_size`` is always the legacy classes' (Megatron-LM's training sizes the embedding table
  from it, before :func:`~megatron_sip.data.config.padded_vocab_size`).

Where the pinned Megatron-Core has the tokenizer's class and it needs no Hugging Face
``transformers`` (not a dependency here), it does the work: SentencePiece, tiktoken and the null
tokenizer. The Hugging Face and GPT-2 BPE types read their files with the ``tokenizers`` library.

Each tokenizer subclasses Megatron-Core's ``MegatronLegacyTokenizer`` (the interface
``GPTDataset`` reads) and offers ``tokenize(text) -> list[int]``, ``detokenize(ids) -> str``,
``vocab_size``, ``eod`` (also ``eos``), ``pad`` and ``bos`` (``-1`` where there is none), ``vocab``
(token -> id) and ``inv_vocab`` (id -> token).

Files are read from local disk only. A missing file, or a file of the wrong kind (a
``tokenizer.json`` given to a SentencePiece type, a SentencePiece model given to
``HuggingFaceTokenizer``, ...) raises :class:`~megatron_sip.errors.ConfigError` naming the flag,
the file and the fix.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterable, Sequence

from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

from megatron_sip.data.config import TokenizerConfig
from megatron_sip.errors import ConfigError

__all__ = [
    "GPT2BPETokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "Llama2Tokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "TikTokenizer",
    "build_tokenizer",
]

# End-of-text tokens, in order of preference, for a tokenizer.json without a tokenizer_config.json
# naming its eos_token.
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
    """The tokenizer ``config.tokenizer_type`` names, loaded from its files."""
    kind, legacy = config.tokenizer_type, config.legacy_tokenizer
    if kind == "GPTSentencePieceTokenizer":
        return GPTSentencePieceTokenizer(config.tokenizer_model)
    if kind == "SentencePieceTokenizer":
        return SentencePieceTokenizer(config.tokenizer_model, config.vocab_extra_ids, legacy)
    if kind == "Llama2Tokenizer":
        return Llama2Tokenizer(config.tokenizer_model, legacy)
    if kind == "HuggingFaceTokenizer":
        include = config.tokenizer_hf_include_special_tokens or legacy
        return HuggingFaceTokenizer(config.tokenizer_model, include_special_tokens=include)
    if kind == "GPT2BPETokenizer":
        return GPT2BPETokenizer(config.vocab_file, config.merge_file)
    if kind == "TikTokenizer":
        return TikTokenizer(
            config.tokenizer_model,
            pattern=config.tiktoken_pattern or "v2",
            vocab_size=config.vocab_size,
            num_special_tokens=config.tiktoken_num_special_tokens,
            special_tokens=config.tokenizer_special_tokens or config.tiktoken_special_tokens,
            legacy=legacy,
        )
    if kind == "NullTokenizer":
        return NullTokenizer(config.vocab_size)
    # TokenizerConfig validates the type; this guards configs built with dataclasses.replace.
    raise ConfigError("--tokenizer-type", f"unknown tokenizer type {kind!r}")


def _ids(ids: Iterable[int]) -> list[int]:
    """Plain Python ints from a list, tensor or numpy array."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


# ---- files: found, readable, and of the kind the flag expects --------------------------------


def _resolve(path: str | None, kind: str, default_name: str, flag: str = "--tokenizer-model"):
    """The file to load: ``path`` itself, or ``path/default_name`` when ``path`` is a directory."""
    if not path:
        raise ConfigError(flag, f"{kind} needs {flag} PATH")
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        inner = os.path.join(path, default_name)
        if not os.path.isfile(inner):
            raise ConfigError(
                flag, f"{path} is a directory without a {default_name}; pass the {kind} file itself"
            )
        return inner
    if not os.path.exists(path):
        raise ConfigError(
            flag,
            f"{kind} file {path} not found; pass a local path (tokenizers are never downloaded)",
        )
    if not os.access(path, os.R_OK):
        raise ConfigError(flag, f"{kind} file {path} is not readable")
    return path


def _sniff(path: str) -> str:
    """What a tokenizer file looks like: ``json-object`` (a tokenizer.json or vocab.json),
    ``json-list`` (a tiktoken vocabulary), ``text`` or ``binary`` (a SentencePiece model is a
    protocol buffer)."""
    with open(path, "rb") as handle:
        start = handle.read(4096)
    stripped = start.lstrip()
    if stripped.startswith(b"{"):
        return "json-object"
    if stripped.startswith(b"["):
        return "json-list"
    try:
        start.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    return "binary" if b"\x00" in start else "text"


_WHAT_IT_IS = {
    "json-object": "a JSON object (a Hugging Face tokenizer.json, or a GPT-2 vocab.json): use "
    "--tokenizer-type HuggingFaceTokenizer, or GPT2BPETokenizer with --vocab-file",
    "json-list": "a JSON list (a tiktoken vocabulary): use --tokenizer-type TikTokenizer",
    "binary": "a binary file (a SentencePiece .model?): use --tokenizer-type "
    "GPTSentencePieceTokenizer, SentencePieceTokenizer or Llama2Tokenizer",
    "text": "a text file (a GPT-2 merges.txt?): pass it as --merge-file with --tokenizer-type "
    "GPT2BPETokenizer",
}


def _wrong_kind(flag: str, path: str, expected: str, error: Exception | None = None):
    found = _sniff(path)
    detail = f" ({error})" if error is not None and found == "binary" else ""
    return ConfigError(
        flag, f"{path} is not {expected}{detail}; it looks like {_WHAT_IT_IS[found]}"
    )


# ---- the shared interface ---------------------------------------------------------------------


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


# ---- SentencePiece: GPTSentencePieceTokenizer, SentencePieceTokenizer, Llama2Tokenizer ---------


class GPTSentencePieceTokenizer(_Tokenizer):
    """A SentencePiece ``.model`` file (or a directory holding ``tokenizer.model``), as
    Megatron-LM's ``GPTSentencePieceTokenizer``: ``tokenize`` is the model's plain encoding (no
    BOS/EOS), ``eod`` its EOS id, ``pad`` and ``bos`` its ids, ``vocab_size`` its piece count.
    Encoding is Megatron-Core's SentencePiece tokenizer. A model without an EOS id cannot end
    documents: loading it fails (SentencePieceTokenizer adds an ``<EOD>`` instead)."""

    def __init__(self, model_path: str | None):
        from megatron.core.tokenizers.text.libraries import SentencePieceTokenizer as CoreSP

        path = _resolve(model_path, "SentencePiece model", "tokenizer.model")
        super().__init__(path)
        self.model_path = path
        try:
            # ignore_extra_whitespaces (its default) encodes the text as given; without
            # special tokens (legacy=False) it is SentencePiece's own encode_as_ids.
            self._core = CoreSP(path)
        except Exception as error:  # sentencepiece raises RuntimeError/OSError on a bad file
            raise _wrong_kind("--tokenizer-model", path, "a SentencePiece model", error) from error
        self._model = self._core.tokenizer
        self._vocab_size = self._model.get_piece_size()
        self._pad = self._model.pad_id()
        self._bos = self._model.bos_id()
        self._eod = self._model.eos_id()
        if self._eod == NO_TOKEN and self._needs_eos():
            raise ConfigError(
                "--tokenizer-model",
                f"SentencePiece model {path} has no EOS piece (eos_id=-1), so documents cannot "
                f"end: retrain it with an EOS id (tools/train_tokenizer.py does), or use "
                "--tokenizer-type SentencePieceTokenizer --legacy-tokenizer (adds <EOD>)",
            )

    def _needs_eos(self) -> bool:
        return True

    def tokenize(self, text: str) -> list[int]:
        return self._core.text_to_ids(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._model.decode(_ids(ids))

    @functools.cached_property
    def vocab(self) -> dict[str, int]:
        return {self._model.id_to_piece(i): i for i in range(self._model.get_piece_size())}


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """A SentencePiece model as Megatron-LM's ``Llama2Tokenizer``: ``eod`` = EOS, ``bos`` and
    ``pad`` the model's. ``tokenize`` prepends BOS with ``--legacy-tokenizer`` (Megatron-LM's
    ``_Llama2Tokenizer.tokenize(bos=True)``); Megatron-Core's tokenizer, Megatron-LM's default,
    adds none."""

    def __init__(self, model_path: str | None, legacy: bool = False):
        super().__init__(model_path)
        self.legacy = legacy
        self.unique_identifiers["legacy"] = legacy
        if legacy and self._bos == NO_TOKEN:
            raise ConfigError(
                "--tokenizer-model",
                f"SentencePiece model {self.model_path} has no BOS piece (bos_id=-1), which "
                "Llama2Tokenizer --legacy-tokenizer prepends; use GPTSentencePieceTokenizer",
            )

    def tokenize(self, text: str) -> list[int]:
        ids = super().tokenize(text)
        return [self._bos, *ids] if self.legacy else ids


class SentencePieceTokenizer(GPTSentencePieceTokenizer):
    """A SentencePiece model as Megatron-LM's ``SentencePieceTokenizer``: the vocabulary gains
    ``<CLS>``, ``<SEP>``, ``<EOD>``, ``<MASK>`` and, when the model has no pad / BOS / EOS piece,
    ``<PAD>`` / ``<BOS>`` / ``<EOS>``, then ``<extra_id_0>`` ... (``--vocab-extra-ids``), each
    appended after the model's pieces unless already one of them. ``vocab_size`` counts them.

    Ids as Megatron-Core's tokenizer gives them (the default): ``tokenize`` is the plain
    encoding, ``eod`` the model's EOS. With ``--legacy-tokenizer`` (Megatron-LM's
    ``_SentencePieceTokenizer``): special-token text in the input becomes its id, and ``eod`` is
    ``<EOD>``."""

    def __init__(self, model_path: str | None, vocab_extra_ids: int = 0, legacy: bool = False):
        self.legacy = legacy
        super().__init__(model_path)

        def piece_or(token_id: int, fallback: str) -> str:
            size = self._model.get_piece_size()
            return self._model.id_to_piece(token_id) if 0 <= token_id < size else fallback

        vocab = dict(super().vocab)
        self._special: dict[str, int] = {}

        def add(token: str) -> int:
            if token not in vocab:
                vocab[token] = len(vocab)
            self._special[token] = vocab[token]
            return vocab[token]

        self._cls, self._sep = add("<CLS>"), add("<SEP>")
        eod_token = add("<EOD>")
        self._mask = add("<MASK>")
        pad = add(piece_or(self._model.pad_id(), "<PAD>"))
        bos = add(piece_or(self._model.bos_id(), "<BOS>"))
        eos = add(piece_or(self._model.eos_id(), "<EOS>"))
        for i in range(vocab_extra_ids):
            add(f"<extra_id_{i}>")
        self._vocab = vocab
        self._vocab_size = len(vocab)
        self.unique_identifiers["vocab_extra_ids"] = vocab_extra_ids
        self.unique_identifiers["legacy"] = legacy
        if legacy:
            self._eod, self._pad, self._bos, self._eos = eod_token, pad, bos, eos
        else:
            self._eos = self._eod

    def _needs_eos(self) -> bool:
        return not self.legacy  # the legacy class ends documents with <EOD>

    @property
    def eos(self) -> int:
        return self._eos

    @property
    def cls(self) -> int:
        return self._cls

    @property
    def sep(self) -> int:
        return self._sep

    @property
    def mask(self) -> int:
        return self._mask

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    def tokenize(self, text: str) -> list[int]:
        if not self.legacy:
            return super().tokenize(text)
        # Megatron-LM's legacy tokenize: the earliest special token in the rest of the text is
        # cut out as its id, the text before it encoded as usual.
        ids: list[int] = []
        while True:
            found = {t: text.find(t) for t in self._special if t in text}
            if not found:
                break
            token = min(found, key=found.get)
            ids += self._model.encode(text[: found[token]])
            ids.append(self._special[token])
            text = text[found[token] + len(token) :]
        return ids + self._model.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        ids = _ids(ids)
        if not self.legacy:
            return self._model.decode([i for i in ids if i < self._model.get_piece_size()])
        inverse = {i: t for t, i in self._special.items()}
        text, last = "", 0
        for position, token_id in enumerate(ids):
            if token_id in inverse:
                text += self._model.decode(ids[last:position]) + " " + inverse[token_id] + " "
                last = position + 1
        return text + self._model.decode(ids[last:])


# ---- Hugging Face tokenizer.json ----------------------------------------------------------------


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HuggingFaceTokenizer(_Tokenizer):
    """A Hugging Face ``tokenizer.json`` (or a directory holding one), read with the
    ``tokenizers`` library; never downloaded from the hub.

    As Megatron-LM: ``eod`` is the tokenizer's ``eos_token``, ``bos`` its ``bos_token``, ``pad``
    its ``pad_token`` (``-1`` when unset), read from ``tokenizer_config.json`` or
    ``special_tokens_map.json`` beside the ``tokenizer.json``, as ``transformers`` does; without
    them, ``eod`` is the first of ``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>`` in
    the vocabulary (loading fails if none is), ``bos`` and ``pad`` likewise. ``tokenize`` adds
    the tokenizer's own special tokens (its post-processor's BOS, for Llama-style tokenizers) only
    with ``--tokenizer-hf-include-special-tokens`` or ``--legacy-tokenizer``, as Megatron-LM 0.16.
    ``vocab_size`` covers every id, added tokens included (``len(tokenizer)``).
    """

    def __init__(self, path: str | None, include_special_tokens: bool = False):
        import tokenizers

        file = _resolve(path, "Hugging Face tokenizer.json", "tokenizer.json")
        super().__init__(file, include_special_tokens=include_special_tokens)
        self.tokenizer_file = file
        self.include_special_tokens = include_special_tokens
        if _sniff(file) != "json-object":
            raise _wrong_kind("--tokenizer-model", file, "a Hugging Face tokenizer.json")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(file)
        except Exception as error:  # tokenizers raises a bare Exception on a bad file
            raise ConfigError(
                "--tokenizer-model",
                f"{file} is a JSON object but not a Hugging Face tokenizer.json ({error}); a GPT-2 "
                "vocab.json goes to --vocab-file with --tokenizer-type GPT2BPETokenizer",
            ) from error
        vocab = self.vocab
        # Ids can have holes (added tokens placed at the end of a reserved range): count to the
        # largest id so that every id has an embedding row.
        self._vocab_size = max(
            self._tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1
        )
        named = self._configured_special_tokens(os.path.dirname(file))

        def lookup(name: str, candidates: Sequence[str]) -> int:
            token = named.get(name)
            if token is not None:
                if token not in vocab:
                    raise ConfigError(
                        "--tokenizer-model",
                        f"{name} {token!r} of {os.path.dirname(file)} is not in {file}",
                    )
                return vocab[token]
            return next((vocab[t] for t in candidates if t in vocab), NO_TOKEN)

        self._eod = lookup("eos_token", EOD_TOKENS)
        if self._eod == NO_TOKEN:
            raise ConfigError(
                "--tokenizer-model",
                f"Hugging Face tokenizer {file} has no end-of-text token (no eos_token in a "
                f"tokenizer_config.json beside it, and none of {', '.join(EOD_TOKENS)}); add one",
            )
        padding = self._tokenizer.padding
        self._pad = lookup("pad_token", () if padding else PAD_TOKENS)
        if self._pad == NO_TOKEN and padding:
            self._pad = padding["pad_id"]
        self._bos = lookup("bos_token", BOS_TOKENS)

    @staticmethod
    def _configured_special_tokens(directory: str) -> dict[str, str]:
        """eos/bos/pad tokens named by tokenizer_config.json (else special_tokens_map.json)."""
        named: dict[str, str] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later one wins
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                continue
            try:
                with open(path, encoding="utf-8") as handle:
                    settings = json.load(handle)
            except (OSError, ValueError) as error:
                raise ConfigError("--tokenizer-model", f"cannot read {path}: {error}") from error
            for key in ("eos_token", "bos_token", "pad_token"):
                token = _token_content(settings.get(key)) if isinstance(settings, dict) else None
                if token is not None:
                    named[key] = token
        return named

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=self.include_special_tokens).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(_ids(ids), skip_special_tokens=False)

    @functools.cached_property
    def vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @functools.cached_property
    def adds_special_tokens(self) -> bool:
        """Whether the tokenizer's own post-processor adds special tokens to every text (Llama's
        BOS; Qwen's adds none): what --tokenizer-hf-include-special-tokens turns on."""
        encode = self._tokenizer.encode
        return encode("a", add_special_tokens=True).ids != encode("a", add_special_tokens=False).ids

    # -- chat template (instruct models) ---------------------------------------------------

    @functools.cached_property
    def chat_template(self) -> str | None:
        """The model's chat template (Jinja), as ``transformers`` finds it beside the
        tokenizer: ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``
        (its ``default`` entry when it names several); None for a base model without one."""
        directory = os.path.dirname(self.tokenizer_file)
        jinja = os.path.join(directory, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as handle:
                return handle.read()
        config_path = os.path.join(directory, "tokenizer_config.json")
        if not os.path.isfile(config_path):
            return None
        with open(config_path, encoding="utf-8") as handle:
            template = json.load(handle).get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {entry.get("name"): entry.get("template") for entry in template}
            template = named.get("default")
        return template if isinstance(template, str) else None

    @functools.cached_property
    def _chat_renderer(self):
        """transformers' tokenizer of the same directory: it renders chat templates exactly as
        the model's own stack does (sandboxed Jinja, special-token variables)."""
        if self.chat_template is None:
            raise ConfigError(
                "--tokenizer-model",
                f"{os.path.dirname(self.tokenizer_file)} has no chat template (no "
                "chat_template.jinja, no chat_template in tokenizer_config.json): a base model",
            )
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(
            tokenizer_file=self.tokenizer_file, chat_template=self.chat_template,
            **self._configured_special_tokens(os.path.dirname(self.tokenizer_file)),
        )  # fmt: skip

    def render_chat(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs,
    ) -> str:
        """The chat template applied to ``messages`` ([{"role", "content"}, ...]); with
        ``add_generation_prompt`` it ends where the assistant's reply starts, with
        ``continue_final_message`` it ends inside the last (assistant) message, so that the model
        continues it. ``template_kwargs`` are the template's own variables (Qwen3's
        ``enable_thinking``, gpt-oss's ``reasoning_effort``)."""
        return self._chat_renderer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **template_kwargs,
        )

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs):
        """Token ids of :meth:`render_chat`; the template writes its own special tokens (BOS),
        so none are added (as ``transformers``' ``apply_chat_template``)."""
        text = self.render_chat(messages, add_generation_prompt, **kwargs)
        return self.tokenize_rendered(text)

    def tokenize_rendered(self, text: str) -> list[int]:
        """Token ids of text a chat template rendered: it holds its own special tokens, so none
        are added whatever --tokenizer-hf-include-special-tokens says."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids


# ---- GPT-2 BPE: vocab.json + merges.txt --------------------------------------------------------


class GPT2BPETokenizer(_Tokenizer):
    """Megatron-LM's ``GPT2BPETokenizer``: GPT-2's byte-level BPE from ``--vocab-file``
    (``vocab.json``) and ``--merge-file`` (``merges.txt``), run by the ``tokenizers`` library with
    GPT-2's pre-tokenization regex. No special tokens are added or recognised in the text;
    ``eod`` is ``<|endoftext|>``, which the vocabulary must hold; ``vocab_size`` is the number of
    entries of ``vocab.json``. The merges file's first line is its ``#version`` header."""

    def __init__(self, vocab_file: str | None, merge_file: str | None):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab_path = _resolve(vocab_file, "GPT-2 vocab.json", "vocab.json", "--vocab-file")
        merge_path = _resolve(merge_file, "GPT-2 merges.txt", "merges.txt", "--merge-file")
        super().__init__(vocab_path, merge_path)
        if _sniff(vocab_path) != "json-object":
            raise _wrong_kind("--vocab-file", vocab_path, "a GPT-2 vocab.json")
        if _sniff(merge_path) != "text":
            raise _wrong_kind("--merge-file", merge_path, "a GPT-2 merges.txt")
        try:
            with open(vocab_path, encoding="utf-8") as handle:
                vocab = json.load(handle)
            if not all(isinstance(v, int) for v in vocab.values()):
                raise ValueError("its values are not all integer ids")
        except ValueError as error:
            raise ConfigError(
                "--vocab-file",
                f"{vocab_path} is not a GPT-2 vocab.json ({error}); a Hugging Face tokenizer.json "
                "goes to --tokenizer-model with --tokenizer-type HuggingFaceTokenizer",
            ) from error
        try:
            model = models.BPE.from_file(vocab_path, merge_path)
        except Exception as error:  # tokenizers raises a bare Exception
            raise ConfigError(
                "--merge-file", f"{merge_path} is not a GPT-2 merges.txt for {vocab_path}: {error}"
            ) from error
        self._tokenizer = Tokenizer(model)
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=False, use_regex=True
        )
        self._tokenizer.decoder = decoders.ByteLevel()
        self._vocab = vocab
        self._vocab_size = len(vocab)
        if "<|endoftext|>" not in vocab:
            raise ConfigError(
                "--vocab-file", f"{vocab_path} has no <|endoftext|>, GPT2BPETokenizer's EOD"
            )
        self._eod = vocab["<|endoftext|>"]

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(_ids(ids), skip_special_tokens=False)

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab


# ---- tiktoken -----------------------------------------------------------------------------------


class TikTokenizer(_Tokenizer):
    """Megatron-LM's ``TikTokenizer``: a tiktoken vocabulary file (a JSON list of
    ``{"rank", "token_bytes", "token_str"}``, ranks 0, 1, ... with the 256 single bytes first)
    behind ``num_special_tokens`` reserved ids, run by Megatron-Core's ``TikTokenTokenizer``.
    The special tokens (default ``<unk> <s> </s> <mask> <pad> <cls> <sep>``) take ids 0, 1, ...,
    ``<SPECIAL_i>`` fill the rest of the reserved range; ``eod`` is ``</s>``, ``bos`` ``<s>``,
    ``pad`` ``<pad>``. ``vocab_size`` (``--vocab-size``, default 131072) includes the reserved ids
    and must not exceed what the file holds. Special-token text becomes its id, except with
    ``--legacy-tokenizer`` (Megatron-LM's ``CustomTikTokenizer`` reads it as plain text)."""

    def __init__(
        self,
        path: str | None,
        pattern: str = "v2",
        vocab_size: int | None = None,
        num_special_tokens: int = 1000,
        special_tokens: Sequence[str] | None = None,
        legacy: bool = False,
    ):
        file = _resolve(path, "tiktoken vocabulary", "tokenizer.json")
        super().__init__(
            file, pattern=pattern, vocab_size=vocab_size, num_special_tokens=num_special_tokens,
            special_tokens=special_tokens, legacy=legacy,
        )  # fmt: skip
        try:
            import tiktoken  # noqa: F401  (Megatron-Core's class needs it, imports it quietly)
        except ImportError as error:
            raise ConfigError(
                "--tokenizer-type",
                f"TikTokenizer needs the tiktoken package ({error}): pip install tiktoken",
            ) from error
        from megatron.core.tokenizers.text.libraries import tiktoken_tokenizer as core

        entries = self._read_vocabulary(file)
        vocab_size = core.DEFAULT_TIKTOKEN_MAX_VOCAB if vocab_size is None else vocab_size
        special = list(special_tokens) if special_tokens else list(core.SPECIAL_TOKENS)
        missing = [t for t in core.SPECIAL_TOKENS if t not in special]
        if missing or len(set(special)) != len(special):
            raise ConfigError(
                "--tokenizer-special-tokens",
                f"must list distinct tokens including {' '.join(core.SPECIAL_TOKENS)}; "
                f"got {' '.join(special)}",
            )
        if not len(special) <= num_special_tokens < vocab_size:
            raise ConfigError(
                "--tiktoken-num-special-tokens",
                f"needs {len(special)} <= {num_special_tokens} < --vocab-size {vocab_size}",
            )
        if vocab_size - num_special_tokens > entries:
            raise ConfigError(
                "--vocab-size",
                f"{file} holds {entries} tokens, so --vocab-size can be at most "
                f"{entries + num_special_tokens} with --tiktoken-num-special-tokens "
                f"{num_special_tokens} (got {vocab_size})",
            )
        self._core = core.TikTokenTokenizer(
            file,
            special_tokens=special,
            num_special_tokens=num_special_tokens,
            pattern=pattern,
            vocab_size=vocab_size,
        )
        self.legacy = legacy
        self._vocab_size = vocab_size
        self._eod, self._bos, self._pad = self._core.eod, self._core.bos_id, self._core.pad_id

    @staticmethod
    def _read_vocabulary(file: str) -> int:
        """Checks the file is a tiktoken vocabulary; returns its number of tokens."""
        expected = "a tiktoken vocabulary (a JSON list of rank/token_bytes/token_str objects)"
        if _sniff(file) != "json-list":
            raise _wrong_kind("--tokenizer-model", file, expected)
        try:
            with open(file, encoding="utf-8") as handle:
                entries = json.load(handle)
        except ValueError as error:
            raise ConfigError("--tokenizer-model", f"{file} is not {expected}: {error}") from error
        keys = {"rank", "token_bytes", "token_str"}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or entry.keys() != keys or entry["rank"] != i:
                raise ConfigError(
                    "--tokenizer-model",
                    f"{file} is not {expected}: entry {i} is {str(entry)[:80]}",
                )
        return len(entries)

    def tokenize(self, text: str) -> list[int]:
        if self.legacy:
            return self._core.tokenizer.encode_ordinary(text)
        return self._core.text_to_ids(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._core.tokenizer.decode(_ids(ids))

    @functools.cached_property
    def vocab(self) -> dict[str, int]:
        return {token: i for i, token in self._core.inv_vocab.items()}

    @property
    def inv_vocab(self) -> dict[int, str]:
        return self._core.inv_vocab


# ---- NullTokenizer ------------------------------------------------------------------------------


class NullTokenizer(_Tokenizer):
    """Megatron-LM's ``NullTokenizer`` (Megatron-Core's ``NullTokenizer`` underneath): text is
    whitespace-separated integer ids; ``--vocab-size N`` gives ids ``0 .. N-1`` for data plus
    ``eod = N``, so ``vocab_size`` is ``N + 1``. ``detokenize`` joins ids with single spaces.
    There is no ``pad`` or ``bos`` (``-1``). Ids outside ``[0, N]`` are rejected."""

    def __init__(self, vocab_size: int | None):
        from megatron.core.tokenizers.text.libraries import NullTokenizer as CoreNull

        if vocab_size is None or int(vocab_size) <= 0:
            raise ConfigError(
                "--vocab-size", f"NullTokenizer needs --vocab-size N > 0, got {vocab_size!r}"
            )
        super().__init__(vocab_size=int(vocab_size))
        self._core = CoreNull(int(vocab_size))
        self._vocab_size = self._core.vocab_size
        self._eod = self._core.eod

    def tokenize(self, text: str) -> list[int]:
        # Megatron's splits on single spaces; any whitespace gives the same ids for its input.
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
        return self._core.ids_to_text(_ids(ids))

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
