"""The SIP policy update in Megatron's forward-step and loss contract (METHOD steps 6 and 7).

Each micro-batch packs, per prefix, the candidates the objective scores after the shared prefix
(``online_dpo``: chosen, rejected; ``rf_nll``: chosen; ``sft_rewrite``: the rewrite), plus the
original when ``--sip-nll-weight`` > 0. A prefix without a usable pair keeps placeholder
candidates with weight 0. The EMA reference scores the objective's candidates in a forward-only
pass of the pipeline schedule before the policy's forward/backward, so its sequence log-probs sit
on the last pipeline stage where the loss is computed; it also scores one rollout per prefix, a
sample of the policy, for the KL estimate.

Normalisation (Megatron's per-token loss contract, ``calculate_per_token_loss``): each
micro-batch's loss function returns the sum of its units' losses and their count, and Megatron
divides the gradient by the count summed over the global batch. So the objective's loss is the
mean over all its units of the global batch (usable pairs for DPO, candidate tokens for NLL),
however they fall into micro-batches and data-parallel ranks, and a micro-batch with nothing to
train on adds nothing. The ``--sip-nll-weight`` term is the mean over the original suffixes'
tokens of the global batch: its sum is rescaled by (global units / global NLL tokens), counts
known before the forward pass (:func:`global_counts`, one all-reduce).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Optional

import torch

from megatron_sip.inference.scoring import (
    PackedCandidates,
    candidate_log_probs,
    forward_packed,
    layout_for,
    layout_length,
    output_weight,
)
from megatron_sip.models.checkpointing import unwrap_model
from megatron_sip.training.sip.candidates import ScoredSample
from megatron_sip.training.sip.config import SIPConfig
from megatron_sip.training.sip.objectives import Objective
from megatron_sip.training.step import forward_backward


@dataclasses.dataclass
class SIPMicroBatch:
    packed: PackedCandidates  # the objective's columns (+ the original with --sip-nll-weight)
    weights: torch.Tensor  # [B] 1 for a prefix that trains, 0 for a placeholder
    lengths: torch.Tensor  # [B, C] tokens of each packed candidate
    reference_packed: Optional[PackedCandidates] = None  # objective's columns (+ the KL probe)
    probe_log_probs: Optional[torch.Tensor] = None  # [B] the probe rollout's sampling log-prob
    reference: Optional[torch.Tensor] = None  # [B, C'] reference sequence log-probs (last stage)


@dataclasses.dataclass
class BatchBuilder:
    """Packs a step's scored samples into micro-batches for the policy and the reference."""

    objective: Objective
    sip: SIPConfig
    pad_id: int
    length_multiple: int = 1  # e.g. the TP size under sequence parallelism
    device: Optional[torch.device] = None
    kl_probe: bool = False  # the reference also scores the first rollout (a policy sample)

    def columns(self, sample: ScoredSample) -> tuple[list[list[int]], float]:
        """The candidates one prefix contributes to the policy pass, and its weight."""
        columns = self.objective.columns(sample)
        weight = 1.0 if columns is not None else 0.0
        if columns is None:
            columns = [sample.original] * self.objective.num_columns
        if self.sip.sip_nll_weight > 0:
            columns = [*columns, sample.original]
        return columns, weight

    def build(
        self, model, scored: Sequence[Sequence[ScoredSample]]
    ) -> tuple[list[SIPMicroBatch], int, int]:
        """Micro-batches, each pass's rows padded to the step's longest one (rounded up to
        ``length_multiple``): (micro-batches, policy length, reference length)."""
        columns = [[self.columns(sample) for sample in batch] for batch in scored]
        length = self._length(model, scored, [[c for c, _ in cols] for cols in columns])
        reference_columns = reference_length = None
        if self.objective.needs_reference:
            reference_columns = [[self._reference_columns(s) for s in batch] for batch in scored]
            reference_length = self._length(model, scored, reference_columns)
        batches = []
        for index, (batch, cols) in enumerate(zip(scored, columns)):
            prefixes = [s.prefix for s in batch]
            candidates = [c for c, _ in cols]
            micro = SIPMicroBatch(
                packed=self._to(layout_for(model, prefixes, candidates, self.pad_id, length)),
                weights=self._to(torch.tensor([w for _, w in cols])),
                lengths=self._to(torch.tensor([[len(c) for c in row] for row in candidates])),
            )
            if reference_columns is not None:
                micro.reference_packed = self._to(
                    layout_for(
                        model, prefixes, reference_columns[index], self.pad_id, reference_length
                    )
                )
            if self.kl_probe:
                micro.probe_log_probs = self._to(
                    torch.tensor([s.rollout_log_probs[0] for s in batch])
                )
            batches.append(micro)
        return batches, length, reference_length

    def _reference_columns(self, sample: ScoredSample) -> list[list[int]]:
        columns = self.columns(sample)[0][: self.objective.num_columns]
        return [*columns, sample.rollouts[0]] if self.kl_probe else columns

    def _length(self, model, scored, columns) -> int:
        length = max(
            layout_length(model, [s.prefix for s in batch], cols)
            for batch, cols in zip(scored, columns)
        )
        return -(-length // self.length_multiple) * self.length_multiple

    def _to(self, value):
        return value.to(self.device) if self.device is not None else value


@dataclasses.dataclass(frozen=True)
class GlobalCounts:
    """Units of the objective and tokens of the original suffixes in the whole global batch."""

    units: float
    original_tokens: float


def global_counts(
    batches: Sequence[SIPMicroBatch], objective: Objective, sip: SIPConfig, data_parallel_group
) -> GlobalCounts:
    """The global batch's counts (one all-reduce over the data-parallel group), known before the
    forward pass: the loss normalisation needs them on every micro-batch."""
    width = objective.num_columns
    counts = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        lengths, weights = batch.lengths.double().cpu(), batch.weights.double().cpu()
        counts[0] += objective.units(lengths[:, :width], weights).sum()
        if sip.sip_nll_weight > 0:
            counts[1] += lengths[:, -1].sum()
    if data_parallel_group is not None and data_parallel_group.size() > 1:
        torch.distributed.all_reduce(counts, group=data_parallel_group)
    return GlobalCounts(*counts.tolist())


def forward_candidates(model, packed: PackedCandidates, fused: bool):
    """The model's output for the packed rows and the output-layer weight the loss needs with
    the fused log-prob path (None: the output is logits)."""
    if not fused:
        return forward_packed(model, packed), None
    weight = output_weight(model) if unwrap_model(model).post_process else None
    return forward_packed(model, packed, hidden_states=True), weight


def _sequence_log_probs(output, packed, weight, tp_group) -> torch.Tensor:
    return candidate_log_probs(output, packed, weight, tp_group=tp_group).sum(-1)


def _reference_loss(packed: PackedCandidates, weight, tp_group, output: torch.Tensor):
    sequences = _sequence_log_probs(output, packed, weight, tp_group)
    zero = torch.zeros((), dtype=torch.int, device=output.device)
    return torch.zeros((), device=output.device), zero, {"reference": sequences.detach()}


def _reference_step(fused: bool, data_iterator, model):
    batch = next(data_iterator)
    output, weight = forward_candidates(model, batch.reference_packed, fused)
    tp_group = unwrap_model(model).pg_collection.tp
    return output, partial(_reference_loss, batch.reference_packed, weight, tp_group)


@torch.no_grad()
def attach_reference_log_probs(
    reference_module, micro_batches: list[SIPMicroBatch], length: int, fused: bool = False
) -> None:
    """Runs the reference over the micro-batches' reference columns (forward-only pipeline
    schedule) and stores its sequence log-probs in each micro-batch on the last stage."""
    rows = micro_batches[0].reference_packed.tokens.shape[0]
    reports = forward_backward(
        partial(_reference_step, fused),
        iter(micro_batches),
        [reference_module],
        num_microbatches=len(micro_batches),
        seq_length=length,
        micro_batch_size=rows,
        forward_only=True,
    )
    for batch, report in zip(micro_batches, reports):
        batch.reference = report["reference"]


def sip_loss(
    objective: Objective,
    sip: SIPConfig,
    counts: GlobalCounts,
    tp_group,
    batch: SIPMicroBatch,
    weight,
    output: torch.Tensor,
):
    """``(loss sum, unit count, reports)`` of one micro-batch (see the module's normalisation).
    ``output``: logits, or hidden states with the output-layer ``weight`` (fused path)."""
    sequences = _sequence_log_probs(output, batch.packed, weight, tp_group)  # [B, C]
    width = objective.num_columns
    lengths, weights = batch.lengths.to(sequences.dtype), batch.weights.to(sequences.dtype)
    reference = batch.reference[:, :width] if objective.needs_reference else None
    term = objective.loss(sequences[:, :width], reference, lengths[:, :width], weights, sip)
    total, count, reports = term.total, term.count, dict(term.reports)
    if sip.sip_nll_weight > 0:
        nll, tokens = -sequences[:, -1].sum(), lengths[:, -1].sum()
        reports["original nll"] = torch.stack([nll.detach(), tokens])
        if counts.units > 0:
            # Megatron divides by the global unit count: this makes the term a token mean.
            total = total + sip.sip_nll_weight * nll * (counts.units / counts.original_tokens)
        else:  # nothing of the objective's in the whole global batch: the NLL term alone
            total, count = sip.sip_nll_weight * nll, tokens
    if batch.probe_log_probs is not None:
        # log pi(y) - log pi_ref(y) on a rollout y ~ pi: KL(pi || pi_ref) per rollout, estimated.
        ratio = batch.probe_log_probs - batch.reference[:, width]
        reports["kl rollouts"] = torch.stack([ratio.sum(), torch.ones_like(ratio).sum()])
    reports["loss"] = torch.stack([total.detach(), count.to(total.dtype)])
    return total, count.round().to(torch.int), reports


def sip_forward_step(
    objective: Objective, sip: SIPConfig, counts: GlobalCounts, fused: bool, data_iterator, model
):
    batch = next(data_iterator)
    output, weight = forward_candidates(model, batch.packed, fused)
    tp_group = unwrap_model(model).pg_collection.tp
    return output, partial(sip_loss, objective, sip, counts, tp_group, batch, weight)


# ---- validation: NLL of the original suffixes of held-out samples -----------------------------


def validation_batch(model, samples, pad_id: int, length: int, device=None) -> PackedCandidates:
    """One column per prefix: its original suffix."""
    prefixes = [s.prefix.tolist() for s in samples]
    packed = layout_for(model, prefixes, [[s.suffix.tolist()] for s in samples], pad_id, length)
    return packed.to(device) if device is not None else packed


def _original_nll(packed: PackedCandidates, weight, tp_group, output: torch.Tensor):
    token_log_probs = candidate_log_probs(output, packed, weight, tp_group=tp_group)
    nll, tokens = -token_log_probs.sum(), packed.mask.sum()
    one = torch.ones((), dtype=torch.int, device=output.device)
    return nll, one, {"original nll": torch.stack([nll.detach(), tokens])}


def validation_step(fused: bool, data_iterator, model):
    packed = next(data_iterator)
    output, weight = forward_candidates(model, packed, fused)
    tp_group = unwrap_model(model).pg_collection.tp
    return output, partial(_original_nll, packed, weight, tp_group)
