"""K rollouts per prefix with a shared, once-computed prefix KV cache, at any TP/PP.

The prefixes of a batch are prefilled together once (batch P, Megatron-Core's
``StaticInferenceContext``) up to the shortest prefix; the cache is then copied to the K sample
rows of each prefix and decoding runs on P*K rows. Longer prefixes finish their remaining prompt
tokens as forced tokens during decoding (Megatron's static-batching scheme: one position per step
for every row, since RoPE and the cache are indexed by a single sequence offset); with prefixes of
equal length, as SIP's left-truncated prefixes usually are, every prefix token is processed once.

Every row gets N new token slots. Tokens after the first EOD (or stop token) keep being sampled
while other rows go on (the batch moves in lockstep) but carry mask 0; once every row has ended,
decoding stops and the remaining slots stay masked. Sampling draws from one seeded generator on
the last pipeline stage over the full-vocabulary logits (identical on every TP rank), so a seed
gives the same rollouts at any TP size; the tokens are broadcast to the other stages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_sip.inference.pipeline import (
    broadcast_from_last_stage,
    is_last_stage,
    pipeline_forward,
    pipeline_group,
    sequence_parallel_off,
)
from megatron_sip.inference.sampling import SamplingConfig, sample
from megatron_sip.models.checkpointing import unwrap_model
from megatron_sip.platform import shared_prefix_decoding


@dataclasses.dataclass
class Rollouts:
    tokens: torch.Tensor  # [P, K, N] sampled token ids
    log_probs: torch.Tensor  # [P, K, N] log-prob of each token under the sampling distribution
    mask: torch.Tensor  # [P, K, N] 1 up to and including the first EOD or stop token, 0 after

    def sequence_log_probs(self) -> torch.Tensor:
        """[P, K] masked sums."""
        return (self.log_probs * self.mask).sum(-1)

    def as_candidates(self) -> list[list[list[int]]]:
        """Per prefix, the K rollouts as token lists cut after their first EOD (what candidate
        scoring takes)."""
        lengths = self.mask.sum(-1).long().tolist()
        tokens = self.tokens.tolist()
        return [
            [row[:length] for row, length in zip(rows, row_lengths)]
            for rows, row_lengths in zip(tokens, lengths)
        ]


def _expand_cache(context: StaticInferenceContext, prefixes: int, samples: int) -> None:
    """Rows [0, P) of every layer's KV cache -> rows [0, P*K), each prefix repeated K times."""
    for layer, (keys, values) in context.key_value_memory_dict.items():
        for cache in (keys, values):
            cache[:, : prefixes * samples] = cache[:, :prefixes].repeat_interleave(samples, dim=1)
        context.key_value_memory_dict[layer] = (keys, values)


def _positions(batch: int, start: int, length: int, device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device).unsqueeze(0).expand(batch, -1)


@torch.no_grad()
def generate(
    model,
    prefixes: Sequence[Sequence[int]],
    *,
    num_samples: int,
    num_tokens: int,
    sampling: SamplingConfig,
    seed: int,
    eod: Optional[int] = None,
    stop: Sequence[int] = (),
    vocab_size: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> Rollouts:
    """``num_samples`` continuations of at most ``num_tokens`` tokens for every prefix
    (collective over the model-parallel ranks; every rank returns the same rollouts). A row ends
    at its first ``eod`` or ``stop`` token (kept, mask 1); decoding ends when every row has. A
    model trained with sequence parallelism decodes without it (:func:`sequence_parallel_off`)."""
    with sequence_parallel_off(model):
        return _generate(
            model,
            prefixes,
            num_samples=num_samples,
            num_tokens=num_tokens,
            sampling=sampling,
            seed=seed,
            eod=eod,
            stop=stop,
            vocab_size=vocab_size,
            device=device,
        )


def _generate(
    model, prefixes, *, num_samples, num_tokens, sampling, seed, eod, stop, vocab_size, device
) -> Rollouts:
    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    device = device or next(module.parameters()).device
    lengths = torch.tensor([len(p) for p in prefixes], device=device)
    if int(lengths.min()) < 1:
        raise ValueError("every prefix needs at least one token")
    num_prefixes, rows = len(prefixes), len(prefixes) * num_samples
    shortest, total = int(lengths.min()), int(lengths.max()) + num_tokens
    tokens = torch.zeros(rows, total, dtype=torch.long, device=device)
    for i, prefix in enumerate(prefixes):
        tokens[i * num_samples : (i + 1) * num_samples, : len(prefix)] = torch.as_tensor(
            prefix, device=device
        )
    row_lengths = lengths.repeat_interleave(num_samples)
    log_probs = torch.zeros(rows, total, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    last_stage, group = is_last_stage(module), pipeline_group(module)
    end_ids = torch.tensor(
        sorted({*stop, *([] if eod is None else [eod])}), dtype=torch.long, device=device
    )
    ended = torch.zeros(rows, dtype=torch.bool, device=device)

    context = StaticInferenceContext(max_batch_size=rows, max_sequence_length=total)
    unique = tokens[::num_samples, :shortest]
    logits = pipeline_forward(
        module,
        unique,
        _positions(num_prefixes, 0, shortest, device),
        inference_context=context,
        runtime_gather_output=True,
    )
    _expand_cache(context, num_prefixes, num_samples)
    context.sequence_len_offset = shortest
    context.enable_decode_mode()
    if last_stage:
        logits = logits[:, -1].repeat_interleave(num_samples, dim=0)

    # Every sample of a prefix holds the prefix's keys and values: attention may read them once.
    with shared_prefix_decoding(num_prefixes, num_samples, shortest):
        for position in range(shortest, total):
            new = (position >= row_lengths) & (position < row_lengths + num_tokens)
            drawn = torch.zeros(rows, dtype=torch.long, device=device)
            drawn_log_probs = torch.zeros(rows, device=device)
            if last_stage:
                drawn, drawn_log_probs = sample(logits, sampling, generator, vocab_size)
            broadcast_from_last_stage(drawn, group)
            tokens[:, position] = torch.where(new, drawn, tokens[:, position])
            log_probs[:, position] = torch.where(new, drawn_log_probs, log_probs[:, position])
            # Every rank holds the same drawn tokens (broadcast), so every rank stops together.
            ended |= new & torch.isin(drawn, end_ids)
            if position == total - 1 or (len(end_ids) and bool(ended.all())):
                break
            logits = pipeline_forward(
                module,
                tokens[:, position : position + 1],
                _positions(rows, position, 1, device),
                inference_context=context,
                runtime_gather_output=True,
            )
            context.sequence_len_offset += 1
            if last_stage:
                logits = logits[:, -1]

    module.train(was_training)
    # Each row's N new tokens start right after its own prefix.
    index = row_lengths.unsqueeze(1) + torch.arange(num_tokens, device=device).unsqueeze(0)
    new_tokens = tokens.gather(1, index)
    new_log_probs = broadcast_from_last_stage(log_probs.gather(1, index).contiguous(), group)
    mask = torch.ones_like(new_tokens, dtype=torch.float)
    if len(end_ids):
        # Keep the end token itself, drop everything after the first one (slots never decoded
        # lie after it).
        is_end = torch.isin(new_tokens, end_ids).long()
        mask = ((is_end.cumsum(-1) - is_end) == 0).float()
    shape = (num_prefixes, num_samples, num_tokens)
    return Rollouts(new_tokens.view(shape), new_log_probs.view(shape), mask.view(shape))


@torch.no_grad()
def generate_by_recompute(
    model,
    prefixes: Sequence[Sequence[int]],
    *,
    num_samples: int,
    num_tokens: int,
    sampling: SamplingConfig,
    seed: int,
    vocab_size: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """The baseline the cached engine is measured and tested against: every new token runs the
    whole sequence (prefix included, once per sample) through the model, no cache. Prefixes
    must have equal lengths. Returns the new tokens [P, K, N]."""
    if len({len(p) for p in prefixes}) != 1:
        raise ValueError("the recompute baseline takes prefixes of equal length")
    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    device = device or next(module.parameters()).device
    tokens = torch.as_tensor(prefixes, device=device).repeat_interleave(num_samples, dim=0)
    generator = torch.Generator(device=device).manual_seed(seed)
    for _ in range(num_tokens):
        length = tokens.shape[1]
        logits = pipeline_forward(
            module,
            tokens,
            _positions(tokens.shape[0], 0, length, device),
            runtime_gather_output=True,
        )
        drawn = torch.zeros(tokens.shape[0], dtype=torch.long, device=device)
        if logits is not None:
            drawn, _ = sample(logits[:, -1], sampling, generator, vocab_size)
        broadcast_from_last_stage(drawn, pipeline_group(module))
        tokens = torch.cat([tokens, drawn.unsqueeze(1)], dim=1)
    module.train(was_training)
    new = tokens[:, len(prefixes[0]) :]
    return new.view(len(prefixes), num_samples, num_tokens)


def greedy_by_recompute(
    model, prefix: Sequence[int], num_tokens: int, device: Optional[torch.device] = None
) -> list[int]:
    """Greedy decoding of one prefix by full recompute (the cache-free reference)."""
    tokens = generate_by_recompute(
        model,
        [prefix],
        num_samples=1,
        num_tokens=num_tokens,
        sampling=SamplingConfig(sip_temperature=0.0),
        seed=0,
        device=device,
    )
    return tokens[0, 0].tolist()
