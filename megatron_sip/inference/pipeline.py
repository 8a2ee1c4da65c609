"""A forward pass through all pipeline stages outside the training schedules (inference).

The pipeline group is the model's own (``GPTModel.pg_collection``, given when it was built)."""

from __future__ import annotations

import contextlib

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


# Module attributes through which Megatron-Core's layers follow config.sequence_parallel (the
# ones megatron.core.transformer.utils.set_model_to_sequence_parallel switches).
_SEQUENCE_PARALLEL_ATTRS = (
    "sequence_parallel",
    "scatter_to_sequence_parallel",
    "reduce_scatter_embeddings",
)


@contextlib.contextmanager
def sequence_parallel_off(model):
    """Runs the model without sequence parallelism inside the block, restoring every setting
    after it. As Megatron-Core's inference: its static-batching engine runs without sequence
    parallelism (decoding feeds one position per step, which cannot be split over the TP ranks),
    switching it off on the model it was trained with. The weights are the same either way:
    only where activations are split changes."""
    module = unwrap_model(model)
    config = module.config
    if not config.sequence_parallel:
        yield
        return
    saved = [
        (layer, name, getattr(layer, name))
        for layer in module.modules()
        for name in _SEQUENCE_PARALLEL_ATTRS
        if hasattr(layer, name)
    ]
    config.sequence_parallel = False
    for layer, name, _ in saved:
        setattr(layer, name, False)
    try:
        yield
    finally:
        config.sequence_parallel = True
        for layer, name, value in saved:
            setattr(layer, name, value)


def pipeline_forward(model, tokens: torch.Tensor, position_ids: torch.Tensor, **kwargs):
    """Runs this rank's stage: receives hidden states from the previous stage, runs the model,
    sends its output to the next stage. Returns the logits on the last stage, None elsewhere.
    Runs without sequence parallelism (:func:`sequence_parallel_off`), so any length works."""
    with sequence_parallel_off(model):
        return _stage_forward(model, tokens, position_ids, **kwargs)


def _stage_forward(model, tokens: torch.Tensor, position_ids: torch.Tensor, **kwargs):
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
