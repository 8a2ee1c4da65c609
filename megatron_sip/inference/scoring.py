"""Log-probs of C candidate suffixes of one prefix, with the prefix processed once.

A row is the packed sequence ``[prefix | c1 | ... | cC]``. The attention mask lets every
candidate token see the prefix and the earlier tokens of its own candidate only, and position ids
restart at the prefix end for every candidate, so each candidate is scored exactly as if it
followed the prefix alone while the prefix's activations are computed once instead of C times.
The token that predicts a candidate's first token is the prefix's last one, shared by all.

Log-probs come from the batched log-prob op (``megatron_sip/ops/dpo.py``) on the vocabulary
shards, so the full vocabulary is never gathered at TP > 1 and no fp32 copy of the logits is made.
The same code scores the unpacked layout (one candidate per row), which is the reference in tests
and the fallback when the model's attention cannot take an arbitrary mask (Transformer Engine /
flash kernels): that fallback is logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from functools import partial
from typing import Optional

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_sip.models.checkpointing import unwrap_model
from megatron_sip.ops.dpo import target_log_probs
from megatron_sip.ops.fused_linear import fused_linear_target_log_probs

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PackedCandidates:
    tokens: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, 1, S, S] bool, True = may not attend
    predict_from: torch.Tensor  # [B, C, N] position whose logits predict each candidate token
    targets: torch.Tensor  # [B, C, N]
    mask: torch.Tensor  # [B, C, N] float, 0 on padding
    candidate_shape: tuple[int, int]  # (prefixes, candidates per prefix) of the results

    @property
    def num_candidates(self) -> int:
        return self.candidate_shape[1]

    @property
    def tokens_processed(self) -> int:
        """Positions the model runs over (padding included)."""
        return self.tokens.numel()

    def to(self, device) -> PackedCandidates:
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )


def pack_candidates(
    prefixes: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    pad_id: int = 0,
    length: int = 0,
) -> PackedCandidates:
    """One row per prefix: ``[prefix | c1 | ... | cC]`` (every prefix has C candidates of up to
    N tokens; shorter candidates are masked), padded to at least ``length`` positions (the
    pipeline schedules need one sequence length for all micro-batches of a step)."""
    if len(prefixes) != len(candidates):
        raise ValueError("one list of candidates per prefix")
    num_candidates = len(candidates[0])
    if any(len(c) != num_candidates for c in candidates):
        raise ValueError("every prefix needs the same number of candidates")
    longest = max(len(c) for cands in candidates for c in cands)
    lengths = [len(p) + sum(len(c) for c in cands) for p, cands in zip(prefixes, candidates)]
    rows, total = len(prefixes), max(max(lengths), length)
    tokens = torch.full((rows, total), pad_id, dtype=torch.long)
    positions = torch.zeros(rows, total, dtype=torch.long)
    blocked = torch.ones(rows, 1, total, total, dtype=torch.bool)
    predict_from = torch.zeros(rows, num_candidates, longest, dtype=torch.long)
    targets = torch.full((rows, num_candidates, longest), pad_id, dtype=torch.long)
    mask = torch.zeros(rows, num_candidates, longest)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    for row, (prefix, cands) in enumerate(zip(prefixes, candidates)):
        if not prefix:
            raise ValueError("every prefix needs at least one token")
        end = len(prefix)
        tokens[row, :end] = torch.as_tensor(prefix)
        positions[row, :end] = torch.arange(end)
        blocked[row, 0, :end, :end] = ~causal[:end, :end]
        start = end
        for index, candidate in enumerate(cands):
            stop = start + len(candidate)
            tokens[row, start:stop] = torch.as_tensor(candidate, dtype=torch.long)
            positions[row, start:stop] = torch.arange(end, end + len(candidate))
            # The prefix, then this candidate causally; nothing of the other candidates.
            blocked[row, 0, start:stop, :end] = False
            blocked[row, 0, start:stop, start:stop] = ~causal[: stop - start, : stop - start]
            sources = [end - 1] + list(range(start, stop - 1))
            predict_from[row, index, : len(candidate)] = torch.as_tensor(sources[: len(candidate)])
            targets[row, index, : len(candidate)] = torch.as_tensor(candidate, dtype=torch.long)
            mask[row, index, : len(candidate)] = 1.0
            start = stop
        # Padding attends to itself only (no empty softmax rows).
        pad = torch.arange(start, total)
        blocked[row, 0, pad, pad] = False
        positions[row, start:] = torch.arange(total - start)
    return PackedCandidates(
        tokens, positions, blocked, predict_from, targets, mask, (rows, num_candidates)
    )


def unpack_candidates(
    prefixes: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    pad_id: int = 0,
    length: int = 0,
) -> PackedCandidates:
    """The same scoring with one ``prefix + candidate`` per row (B*C rows): the reference, and
    the fallback for attention kernels without arbitrary masks."""
    flat = pack_candidates(
        [p for p, cands in zip(prefixes, candidates) for _ in cands],
        [[c] for cands in candidates for c in cands],
        pad_id,
        length,
    )
    return dataclasses.replace(flat, candidate_shape=(len(prefixes), len(candidates[0])))


class _RotaryAtPositions(torch.nn.Module):
    """Stands in for GPTModel.rotary_pos_emb: rotary angles for explicit position ids, so that
    every packed candidate restarts at the prefix end (GPTModel derives them from the sequence
    length alone)."""

    def __init__(self, rotary: torch.nn.Module, position_ids: torch.Tensor):
        super().__init__()
        self.rotary = rotary
        self.position_ids = position_ids

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return int(self.position_ids.max()) + 1

    def forward(self, *args, **kwargs) -> torch.Tensor:
        table = self.rotary(self.get_rotary_seq_len())  # [L, 1, 1, D]
        return table[self.position_ids.t()].squeeze(2)  # [S, B, 1, D]


@contextlib.contextmanager
def _positions_for_rope(module, position_ids: torch.Tensor):
    rotary = getattr(module, "rotary_pos_emb", None)
    if module.position_embedding_type != "rope" or rotary is None:
        yield
        return
    module.rotary_pos_emb = _RotaryAtPositions(rotary, position_ids)
    try:
        yield
    finally:
        module.rotary_pos_emb = rotary


def supports_packed_scoring(model) -> bool:
    """Packing needs attention that applies an arbitrary mask: Megatron-Core's local
    DotProductAttention does; fused TE / flash kernels take causal or padding masks only."""
    module = unwrap_model(model)
    cores = [m.core_attention for m in module.modules() if hasattr(m, "core_attention")]
    return all(isinstance(core, DotProductAttention) for core in cores)


def length_multiple(model) -> int:
    """What every row length must be a multiple of: under sequence parallelism each
    tensor-parallel rank holds 1/TP of the sequence outside attention and the MLP, so the TP
    size; else 1."""
    config = unwrap_model(model).config
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


def layout_for(model, prefixes, candidates, pad_id: int = 0, length: int = 0) -> PackedCandidates:
    """The packed layout where the model can take it, else the unpacked one (logged); rows are
    padded to at least ``length`` and to a multiple of :func:`length_multiple`."""
    multiple = length_multiple(model)
    length = -(-max(length, layout_length(model, prefixes, candidates)) // multiple) * multiple
    if supports_packed_scoring(model):
        return pack_candidates(prefixes, candidates, pad_id, length)
    logger.warning(
        "the model's attention kernel cannot take the shared-prefix mask: scoring each "
        "candidate with its own copy of the prefix instead"
    )
    return unpack_candidates(prefixes, candidates, pad_id, length)


def layout_length(model, prefixes, candidates) -> int:
    """Positions per row :func:`layout_for` needs for these candidates (before padding to a
    longer ``length``), a multiple of :func:`length_multiple`."""
    if supports_packed_scoring(model):
        pairs = zip(prefixes, candidates)
        length = max(len(p) + sum(len(c) for c in cands) for p, cands in pairs)
    else:
        length = max(len(p) + len(c) for p, cands in zip(prefixes, candidates) for c in cands)
    multiple = length_multiple(model)
    return -(-length // multiple) * multiple


class _HiddenStatesOut(torch.nn.Module):
    """Stands in for GPTModel.output_layer: returns its input (the final hidden states, gathered
    from sequence-parallel shards) instead of logits, so the log-prob op can make the logits
    chunk by chunk itself."""

    def __init__(self, output_layer: torch.nn.Module):
        super().__init__()
        self.output_layer = output_layer

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        del weight, runtime_gather_output
        if getattr(self.output_layer, "sequence_parallel", False):
            # The op all-reduces the hidden states' gradient itself: split, not reduce-scatter.
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden, None


def output_weight(model) -> torch.Tensor:
    """This rank's output-layer weight shard [V/TP, H] (the embedding when they are tied)."""
    module = unwrap_model(model)
    if module.share_embeddings_and_output_weights:
        return module.shared_embedding_or_output_weight()
    return module.output_layer.weight


def forward_packed(model, packed: PackedCandidates, *, hidden_states: bool = False, **kwargs):
    """The model over the packed rows: vocab-parallel logits [B, S, V/TP] on the last stage, or
    with ``hidden_states`` the final hidden states [B, S, H] there (for
    :func:`candidate_log_probs` with ``weight``); hidden states on the other stages. Used as the
    body of a Megatron forward step."""
    module = unwrap_model(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_positions_for_rope(module, packed.position_ids))
        if hidden_states and module.post_process:
            layer = module.output_layer
            module.output_layer = _HiddenStatesOut(layer)
            stack.callback(setattr, module, "output_layer", layer)
        return model(packed.tokens, packed.position_ids, packed.attention_mask, **kwargs)


def candidate_log_probs(
    output: torch.Tensor,
    packed: PackedCandidates,
    weight: Optional[torch.Tensor] = None,
    *,
    tp_group=None,
) -> torch.Tensor:
    """Per-token log-probs ``[B, C, N]`` (0 on padding) from vocab-parallel logits [R, S, V/TP]
    (R = B rows packed, B*C rows unpacked), or, with the output-layer ``weight`` shard, from the
    final hidden states [R, S, H] (the fused path: logits made chunk by chunk, never whole).
    ``tp_group``: the tensor-parallel group the vocabulary is split over (the model's; None:
    the whole vocabulary is local)."""
    rows, per_row, length = packed.targets.shape
    index = packed.predict_from.view(rows, -1)
    selected = output.gather(1, index.unsqueeze(-1).expand(-1, -1, output.shape[-1]))
    group = tp_group
    shard = weight.shape[0] if weight is not None else output.shape[-1]
    vocab_start = group.rank() * shard if group is not None else 0
    targets = packed.targets.view(rows, -1)
    if weight is not None:
        values = fused_linear_target_log_probs(
            selected, weight, targets, vocab_start=vocab_start, group=group
        )
    else:
        # The batched log-prob op on this rank's vocabulary shard (no fp32 copy of the logits).
        values = target_log_probs(selected, targets, vocab_start=vocab_start, group=group)
    token_log_probs = values.reshape(rows, per_row, length) * packed.mask
    return token_log_probs.view(*packed.candidate_shape, length)


def sequence_log_probs(token_log_probs: torch.Tensor) -> torch.Tensor:
    """Masked sums ``[B, C]``."""
    return token_log_probs.sum(-1)


def scoring_forward_step(packed: PackedCandidates, loss_func, data_iterator, model):
    """A Megatron forward step over one packed micro-batch: ``loss_func(packed, tp_group,
    logits)`` turns the last stage's logits (split over the model's tensor-parallel group) into
    ``(loss, num_tokens, report)``."""
    del data_iterator
    tp_group = unwrap_model(model).pg_collection.tp
    return forward_packed(model, packed), partial(loss_func, packed, tp_group)
