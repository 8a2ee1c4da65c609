"""Next-token NLL in Megatron's forward-step / loss-function contract."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of per-token losses under the mask, as ``(loss_sum, num_tokens, {name: [sum, count]})``
    which Megatron's schedules average per micro-batch and report over data-parallel ranks."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def lm_forward_step(data_iterator: Iterator[dict], model):
    """Megatron forward step: a batch of ``tokens, labels, loss_mask, position_ids`` ->
    per-token losses and the loss function that reduces them."""
    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),  # None: the attention layer's own causal mask
        labels=batch["labels"],
    )
    return output, partial(masked_token_loss, batch["loss_mask"])
