"""A forward pass through all pipeline stages outside the training schedules (inference).

The pipeline group is the model's own (``GPTModel.pg_collection``, given when it was built)."""

from __future__ import annotations

import torch
from megatron.core.inference.communication_utils import (
    recv_from_prev_pipeline_rank_,
    send_to_next_pipeline_rank,
)
from megatron.core.pipeline_parallel.utils import (
    get_pp_last_rank,
    is_pp_first_stage,
    is_pp_last_stage,
)

from megatron_sip.models.checkpointing import unwrap_model


def pipeline_group(model) -> torch.distributed.ProcessGroup:
    """The pipeline-parallel group the model was built with."""
    return unwrap_model(model).pg_collection.pp


def is_last_stage(model) -> bool:
    return is_pp_last_stage(pipeline_group(model))


def pipeline_forward(model, tokens: torch.Tensor, position_ids: torch.Tensor, **kwargs):
    """Runs this rank's stage: receives hidden states from the previous stage, runs the model,
    sends its output to the next stage. Returns the logits on the last stage, None elsewhere."""
    module = unwrap_model(model)
    group = module.pg_collection.pp
    if not is_pp_first_stage(group):
        batch, length = tokens.shape
        hidden = torch.empty(
            length,
            batch,
            module.config.hidden_size,
            dtype=module.config.pipeline_dtype or torch.float32,
            device=tokens.device,
        )
        recv_from_prev_pipeline_rank_(hidden, pp_group=group)
        module.set_input_tensor(hidden)
    output = module(tokens, position_ids, kwargs.pop("attention_mask", None), **kwargs)
    if not is_pp_last_stage(group):
        send_to_next_pipeline_rank(output.contiguous(), pp_group=group)
        return None
    return output


def broadcast_from_last_stage(tensor: torch.Tensor, group) -> torch.Tensor:
    """Copies ``tensor`` (same shape and dtype on every rank) from the last stage of the
    pipeline ``group``."""
    if group.size() > 1:
        torch.distributed.broadcast(tensor, src=get_pp_last_rank(group), group=group)
    return tensor
