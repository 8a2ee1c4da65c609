"""The SIP policy update in Megatron's forward-step contract (METHOD steps 6 and 7).

Each micro-batch packs, per prefix, the candidates the loss needs after the shared prefix
(``online_dpo``: chosen, rejected; ``rf_nll``: chosen; ``sft_rewrite``: the rewrite; plus the
original when ``--sip-nll-weight`` > 0). The EMA reference scores the same packed rows in a
forward-only pass of the pipeline schedule before the policy's forward/backward, so its
sequence log-probs sit on the last pipeline stage where the loss is computed. A prefix without a
usable pair keeps placeholder candidates with weight 0.
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
from megatron_sip.training.sip.losses import dpo_loss
from megatron_sip.training.step import forward_backward


@dataclasses.dataclass
class SIPMicroBatch:
    packed: PackedCandidates
    weights: torch.Tensor  # [B] 1 for a prefix that trains, 0 for a skipped one
    reference: Optional[torch.Tensor] = None  # [B, C] reference sequence log-probs (last stage)


def _candidates(sample: ScoredSample, sip: SIPConfig) -> tuple[list[list[int]], float]:
    """The candidates one prefix contributes, and its weight."""
    selection = sample.selection
    if sip.sip_loss == "sft_rewrite":
        usable = sample.rewrite is not None
        columns = [sample.rewrite if usable else sample.original]
    elif sip.sip_loss == "rf_nll":
        usable = selection.chosen is not None
        columns = [sample.tokens(selection.chosen) if usable else sample.original]
    else:
        usable = selection.skipped is None
        if usable:
            columns = [sample.tokens(selection.chosen), sample.tokens(selection.rejected)]
        else:
            columns = [sample.original, sample.original]
    if sip.sip_nll_weight > 0:
        columns.append(sample.original)
    return columns, 1.0 if usable else 0.0


def build_micro_batches(
    model,
    scored: Sequence[Sequence[ScoredSample]],
    sip: SIPConfig,
    *,
    pad_id: int,
    length_multiple: int = 1,
    device=None,
) -> tuple[list[SIPMicroBatch], int]:
    """Packed micro-batches, all padded to the step's longest row (rounded up to
    ``length_multiple``, e.g. the TP size under sequence parallelism); returns them and that
    length."""
    columns = [[_candidates(sample, sip) for sample in batch] for batch in scored]
    length = max(
        layout_length(model, [s.prefix for s in batch], [c for c, _ in cols])
        for batch, cols in zip(scored, columns)
    )
    length = -(-length // length_multiple) * length_multiple
    micro_batches = []
    for batch, cols in zip(scored, columns):
        packed = layout_for(model, [s.prefix for s in batch], [c for c, _ in cols], pad_id, length)
        weights = torch.tensor([w for _, w in cols])
        if device is not None:
            packed, weights = packed.to(device), weights.to(device)
        micro_batches.append(SIPMicroBatch(packed, weights))
    return micro_batches, length


def forward_candidates(model, packed: PackedCandidates, fused: bool):
    """The model's output for the packed rows and the output-layer weight the loss needs with
    the fused log-prob path (None: the output is logits)."""
    if not fused:
        return forward_packed(model, packed), None
    weight = output_weight(model) if unwrap_model(model).post_process else None
    return forward_packed(model, packed, hidden_states=True), weight


def _reference_loss(packed: PackedCandidates, weight, output: torch.Tensor):
    sequences = candidate_log_probs(output, packed, weight).sum(-1)
    one = torch.ones((), dtype=torch.int, device=output.device)
    return torch.zeros((), device=output.device), one, {"reference": sequences.detach()}


def _reference_step(fused: bool, data_iterator, model):
    batch = next(data_iterator)
    output, weight = forward_candidates(model, batch.packed, fused)
    return output, partial(_reference_loss, batch.packed, weight)


@torch.no_grad()
def attach_reference_log_probs(
    reference_module, micro_batches: list[SIPMicroBatch], length: int, fused: bool = False
):
    """Runs the reference over the micro-batches (forward-only pipeline schedule) and stores its
    sequence log-probs in each micro-batch on the last stage."""
    rows = micro_batches[0].packed.tokens.shape[0]
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


def sip_loss(sip: SIPConfig, batch: SIPMicroBatch, weight, output: torch.Tensor):
    """``(loss, 1, reports)`` for one micro-batch: the loss is already a per-micro-batch mean
    (per pair for DPO, per token for NLL), so the schedule only averages over micro-batches.
    ``output``: logits, or hidden states with the output-layer ``weight`` (fused path)."""
    packed, weights = batch.packed, batch.weights
    token_log_probs = candidate_log_probs(output, packed, weight)  # [B, C, N]
    sequences = token_log_probs.sum(-1)
    counts = packed.mask.view(*packed.candidate_shape, -1).sum(-1)  # [B, C] tokens
    used = weights.sum()
    reports = {}
    if sip.sip_loss == "online_dpo":
        reference = batch.reference
        losses, margins = dpo_loss(
            sequences[:, 0], sequences[:, 1], reference[:, 0], reference[:, 1], sip.sip_dpo_beta
        )
        loss = (losses * weights).sum() / used.clamp(min=1)
        chosen_ratio = (sequences[:, 0] - reference[:, 0]).detach()
        reports["dpo loss"] = torch.stack([(losses * weights).sum().detach(), used])
        reports["dpo margin"] = torch.stack([(margins * weights).sum(), used])
        correct = ((margins > 0).float() * weights).sum()
        reports["preference accuracy"] = torch.stack([correct, used])
        # Per-token log(pi / pi_ref) on the chosen side: a KL(pi || pi_ref) estimate.
        reports["chosen kl"] = torch.stack(
            [(chosen_ratio * weights).sum(), (counts[:, 0] * weights).sum()]
        )
    else:
        nll = -(sequences[:, 0] * weights).sum()
        tokens = (counts[:, 0] * weights).sum()
        loss = nll / tokens.clamp(min=1)
        reports["chosen nll"] = torch.stack([nll.detach(), tokens])
    if sip.sip_nll_weight > 0:
        nll = -sequences[:, -1].sum()
        tokens = counts[:, -1].sum()
        loss = loss + sip.sip_nll_weight * nll / tokens.clamp(min=1)
        reports["original nll"] = torch.stack([nll.detach(), tokens])
    reports["loss"] = torch.stack([loss.detach(), torch.ones_like(used)])
    return loss, torch.ones((), dtype=torch.int, device=loss.device), reports


def sip_forward_step(sip: SIPConfig, fused: bool, data_iterator, model):
    batch = next(data_iterator)
    output, weight = forward_candidates(model, batch.packed, fused)
    return output, partial(sip_loss, sip, batch, weight)
