"""Builds the policy / judge / rewriter network: Megatron-Core's GPTModel at any TP/PP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel.utils import is_pp_first_stage, is_pp_last_stage
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_block import get_num_layers_to_build

from megatron_sip import platform
from megatron_sip.initialize import ParallelConfig
from megatron_sip.models.config import ModelConfig


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    bf16: bool = False,
    fp16: bool = False,
    calculate_per_token_loss: bool = False,
) -> TransformerConfig:
    """Megatron-Core's TransformerConfig for this architecture and parallel layout."""
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_size(),
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups if model.group_query_attention else None,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=not model.disable_bias_linear,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        bf16=bf16,
        fp16=fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        calculate_per_token_loss=calculate_per_token_loss,
        **_model_flag_settings(model),
    )


def _model_flag_settings(model: ModelConfig) -> dict:
    """The TransformerConfig settings of the Megatron-LM model flags (kv channels, zero-centred
    gamma, attention backend, cross-entropy fusion, recompute, FP8, fusions), after refusing
    what the active device cannot run."""
    model.check_device(platform.active_device())
    return dict(
        kv_channels=model.kv_channels,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        layernorm_zero_centered_gamma=model.apply_layernorm_1p,
        attention_backend=AttnBackend[model.attention_backend],
        cross_entropy_loss_fusion=model.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=model.cross_entropy_fusion_impl,
        recompute_granularity=model.recompute_granularity,
        recompute_method=model.recompute_method,
        recompute_num_layers=model.recompute_num_layers,
        recompute_modules=model.recompute_modules,
        fp8=model.fp8_format,
        fp8_recipe=model.fp8_recipe,
        fp8_amax_history_len=model.fp8_amax_history_len,
        fp8_amax_compute_algo=model.fp8_amax_compute_algo,
        fp8_param=model.fp8_param_gather,
        **platform.model_config_overrides(model.fusions()),
    )


def layer_spec(
    model: ModelConfig, config: TransformerConfig, pg_collection: ProcessGroupCollection
):
    """Transformer Engine's layer spec when selected, else Megatron-Core's local modules as a
    block spec for this pipeline stage, with the platform's norm (sequence parallelism and
    zero-centred gamma without apex: :func:`platform.local_block_spec`)."""
    if model.use_transformer_engine(platform.active_device()):
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    layers = get_num_layers_to_build(config, pp_rank=pg_collection.pp.rank())
    local_spec = get_gpt_layer_local_spec(
        normalization=model.normalization, qk_layernorm=model.qk_layernorm
    )
    return platform.local_block_spec(local_spec, config, layers)


def build_gpt_model(
    model: ModelConfig,
    config: TransformerConfig,
    vocab_size: int,
    pg_collection: ProcessGroupCollection,
) -> GPTModel:
    """This rank's pipeline stage of the model, communicating over ``pg_collection``'s groups
    (the model keeps them: inference and scoring read them from it)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, config, pg_collection),
        vocab_size=vocab_size,
        max_sequence_length=model.seq_length_limit() or model.seq_length,
        pre_process=is_pp_first_stage(pg_collection.pp),
        post_process=is_pp_last_stage(pg_collection.pp),
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_base=model.rotary_base,
        rotary_percent=model.rotary_percent,
        rope_scaling=model.use_rope_scaling,
        rope_scaling_factor=model.rope_scaling_factor,
        pg_collection=pg_collection,
    )


def wrap_with_ddp(
    module: GPTModel,
    config: TransformerConfig,
    pg_collection: ProcessGroupCollection,
    *,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
    grad_reduce_in_bf16: bool = False,
    check_for_nan_in_grad: bool = True,
) -> DistributedDataParallel:
    """Megatron's DDP wrapper: contiguous gradient buffers (fp32 unless ``grad_reduce_in_bf16``)
    reduced over data-parallel ranks, per bucket during the backward pass with
    ``overlap_grad_reduce``. ``check_for_nan_in_grad`` raises on a NaN gradient mid-step; the
    trainers turn it off and skip such a step instead (``training/step.py``)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=not grad_reduce_in_bf16,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=check_for_nan_in_grad,
    )
    return DistributedDataParallel(
        config=config, ddp_config=ddp_config, module=module, pg_collection=pg_collection
    )


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    vocab_size: int,
    pg_collection: ProcessGroupCollection,
    *,
    bf16: bool = False,
    fp16: bool = False,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
    grad_reduce_in_bf16: bool = False,
    calculate_per_token_loss: bool = False,
) -> tuple[list[DistributedDataParallel], TransformerConfig]:
    """This rank's model chunks, DDP-wrapped, and their TransformerConfig. With
    ``calculate_per_token_loss`` the loss function's sum is divided by the count it reports,
    summed over the global batch (Megatron's per-token loss), instead of averaged per
    micro-batch and data-parallel rank. ``fp16``/``bf16`` wrap the model in Megatron's
    Float16Module (half-precision weights and activations, fp32 loss)."""
    config = transformer_config(
        model, parallel, bf16=bf16, fp16=fp16, calculate_per_token_loss=calculate_per_token_loss
    )
    module = build_gpt_model(model, config, vocab_size, pg_collection)
    if bf16 or fp16:
        module = Float16Module(config, module)
    chunk = wrap_with_ddp(
        module,
        config,
        pg_collection,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        grad_reduce_in_bf16=grad_reduce_in_bf16,
        # Off: a NaN or Inf gradient skips the step in training/step.py (counted, and
        # --max-skipped-steps in a row stop the run) instead of raising mid-backward.
        check_for_nan_in_grad=False,
    )
    return [chunk], config
