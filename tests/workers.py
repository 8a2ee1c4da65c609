"""Code that runs inside the spawned ranks of the multi-process tests."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from megatron_sip.initialize import ParallelConfig, initialize_distributed
from megatron_sip.models.checkpointing import unwrap_model
from megatron_sip.models.config import ModelConfig
from megatron_sip.models.gpt import build_model
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.optimizer import build_optimizer
from megatron_sip.training.step import configure_schedule, forward_backward

VOCAB = 256  # padded size is the same at TP 1 and 2, so checkpoints reshard
SEQ = 32
BATCH = 2


def tiny_llama(**overrides) -> ModelConfig:
    values = dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        group_query_attention=True,
        num_query_groups=2,
        seq_length=SEQ,
        position_embedding_type="rope",
        normalization="RMSNorm",
        swiglu=True,
        untie_embeddings_and_output_weights=True,
        disable_bias_linear=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        transformer_impl="local",
    )
    values.update(overrides)
    return ModelConfig(**values)


def setup(tp: int = 1, pp: int = 1, seed: int = 1234):
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    context = initialize_distributed(parallel, "cpu", seed)
    return parallel, context


def build(parallel: ParallelConfig, context, model: ModelConfig | None = None, **kwargs):
    return build_model(model or tiny_llama(), parallel, VOCAB, context.pg_collection, **kwargs)


def build_with_optimizer(parallel, context, training: TrainingConfig | None = None):
    training = training or TrainingConfig(
        micro_batch_size=BATCH, lr=1e-2, train_iters=10, clip_grad=1.0
    )
    chunks, config = build(
        parallel,
        context,
        bf16=training.bf16,
        use_distributed_optimizer=training.use_distributed_optimizer,
    )
    optimizer, scheduler = build_optimizer(training, chunks, context.data_parallel_size)
    configure_schedule(config, chunks, optimizer)
    return chunks, config, optimizer, scheduler


def fixed_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(BATCH, SEQ),
        "position_ids": torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1),
    }


def _full_logits_loss(labels, logits):
    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
    )
    count = torch.tensor(labels.numel(), dtype=torch.int)
    report = {"loss": torch.stack([loss_sum.detach(), count.float()]), "logits": logits.detach()}
    return loss_sum, count, report


def full_logits_forward_step(data_iterator, model):
    """Forward step whose output is the full-vocabulary logits (gathered over TP ranks)."""
    batch = next(data_iterator)
    logits = model(batch["tokens"], batch["position_ids"], None, runtime_gather_output=True)
    return logits, partial(_full_logits_loss, batch["labels"])


def logits_and_loss(chunks, batch, forward_only: bool):
    """(logits, loss) on the last pipeline stage, (None, None) on the others."""
    reports = forward_backward(
        full_logits_forward_step,
        iter([batch]),
        chunks,
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=forward_only,
    )
    if not reports:
        return None, None
    loss_sum, count = reports[0]["loss"]
    return reports[0]["logits"], (loss_sum / count).item()


def named_grads(chunks) -> dict[str, torch.Tensor]:
    model = unwrap_model(chunks[0])
    return {name: param.main_grad.detach().clone() for name, param in model.named_parameters()}


def named_params(module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in unwrap_model(module).named_parameters()}


def draw_rng_sample() -> dict[str, torch.Tensor]:
    """One draw from every generator a checkpoint restores."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        model_parallel = torch.rand(4)
    return {
        "python": torch.tensor([random.random()]),
        "numpy": torch.from_numpy(np.random.rand(4)),
        "torch": torch.rand(4),
        "model_parallel": model_parallel,
    }
