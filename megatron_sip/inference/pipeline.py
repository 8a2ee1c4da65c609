"""A forward pass through all pipeline stages outside the training schedules (inference)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.inference.communication_utils import (
    recv_from_prev_pipeline_rank_,
    send_to_next_pipeline_rank,
)

from megatron_sip.models.checkpointing import unwrap_model


def pipeline_forward(model, tokens: torch.Tensor, position_ids: torch.Tensor, **kwargs):
    """Runs this rank's stage: receives hidden states from the previous stage, runs the model,
    sends its output to the next stage. Returns the logits on the last stage, None elsewhere."""
    module = unwrap_model(model)
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if not first:
        batch, length = tokens.shape
        hidden = torch.empty(
            length,
            batch,
            module.config.hidden_size,
            dtype=module.config.pipeline_dtype or torch.float32,
            device=tokens.device,
        )
        recv_from_prev_pipeline_rank_(hidden)
        module.set_input_tensor(hidden)
    output = module(tokens, position_ids, kwargs.pop("attention_mask", None), **kwargs)
    if not last:
        send_to_next_pipeline_rank(output.contiguous())
        return None
    return output


def broadcast_from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    """Copies ``tensor`` (same shape and dtype on every rank) from the last pipeline stage."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            tensor,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return tensor
