"""The rewrite of each original suffix (METHOD step 2), from the frozen rewriter or from a
precomputed rewrite store, as tokens the policy would see after the prefix.

Texts go both ways in the prefix's context: the original suffix is decoded after the prefix's
tokens (decoded alone, a suffix that starts a new word loses its leading space), and the rewrite
is tokenized after them (tokenized alone, a rewrite that goes on inside a word the prefix cut
would start with a word-start piece the policy never sees there). A rewriter that strips its
output keeps the original's leading white space: the rewrite replaces the suffix where it stands.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

from megatron_sip.data.sip_dataset import SIPSample
from megatron_sip.data.tokenizers import decode_continuation, encode_continuation
from megatron_sip.roles.base import Rewriter, call_role
from megatron_sip.roles.rewrite_store import RewriteStore


def sample_texts(tokenizer, sample: SIPSample) -> tuple[str, str]:
    """(prefix text, original suffix text decoded after the prefix) of a sample: what the
    rewriter and the judge read."""
    prefix = sample.prefix.tolist()
    return tokenizer.detokenize(prefix), decode_continuation(tokenizer, prefix, sample.suffix)


def with_leading_space_of(original: str, rewrite: str) -> str:
    """``rewrite`` with exactly ``original``'s leading white space."""
    return original[: len(original) - len(original.lstrip())] + rewrite.lstrip()


def encode_rewrite(
    tokenizer, prefix: Sequence[int], original: str, rewrite: Optional[str], max_tokens: int
) -> Optional[list[int]]:
    """The rewrite's tokens after the prefix, at most ``max_tokens`` (the suffix length); None
    stays None (a missing rewrite). An empty rewrite means "the text should end here": EOD."""
    if rewrite is None:
        return None
    text = with_leading_space_of(original, rewrite)
    tokens = encode_continuation(tokenizer, prefix, text)[:max_tokens] if text.strip() else []
    return tokens or [tokenizer.eod]


@dataclasses.dataclass
class RewriteSource:
    tokenizer: object
    max_tokens: int  # the suffix length N
    rewriter: Optional[Rewriter] = None
    store: Optional[RewriteStore] = None
    group: object = (
        None  # the model-parallel group: a non-collective rewriter runs on its first rank
    )

    def __post_init__(self):
        if (self.rewriter is None) == (self.store is None):
            raise ValueError("give a rewriter or a rewrite store, not both or neither")

    def rewrites(
        self, samples: Sequence[SIPSample], texts: Sequence[tuple[str, str]]
    ) -> list[Optional[list[int]]]:
        """Each sample's rewrite as tokens (None where it is missing); ``texts``: the samples'
        (prefix, original) texts from :func:`sample_texts`."""
        if self.store is not None:
            rewritten = [self.store.get(sample.key) for sample in samples]
        else:
            rewriter = self.rewriter
            rewritten = call_role(
                lambda: rewriter.rewrite([p for p, _ in texts], [o for _, o in texts]),
                rewriter.collective,
                self.group,
            )
        return [
            encode_rewrite(self.tokenizer, sample.prefix, original, text, self.max_tokens)
            for sample, (_, original), text in zip(samples, texts, rewritten)
        ]
