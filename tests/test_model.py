"""The Llama-style GPTModel: RMSNorm, SwiGLU, RoPE, GQA, untied embeddings, no biases."""

from __future__ import annotations

import pytest
import torch

from megatron_sip.initialize import destroy_distributed
from megatron_sip.models.checkpointing import unwrap_model

from . import workers
from .distributed import run_ranks


def structure_worker(tp: int) -> None:
    parallel, context = workers.setup(tp=tp)
    model_cfg = workers.tiny_llama()
    chunks, config = workers.build(parallel, context, model_cfg)
    model = unwrap_model(chunks[0])
    names = dict(model.named_parameters())
    head_dim = model_cfg.hidden_size // model_cfg.num_attention_heads
    layer = model.decoder.layers[0]

    assert not [n for n in names if n.endswith("bias")], "Llama has no linear biases"
    assert type(layer.input_layernorm).__name__ == "RMSNorm"
    assert type(model.decoder.final_layernorm).__name__ == "RMSNorm"
    assert config.gated_linear_unit and config.activation_func is torch.nn.functional.silu
    # SwiGLU: fc1 holds gate and up projections.
    assert layer.mlp.linear_fc1.weight.shape[0] == 2 * model_cfg.ffn_hidden_size // tp
    # GQA: q for every head, k and v for each of the 2 groups.
    qkv_rows = (model_cfg.num_attention_heads + 2 * model_cfg.num_query_groups) * head_dim
    assert layer.self_attention.linear_qkv.weight.shape[0] == qkv_rows // tp
    assert hasattr(model, "rotary_pos_emb") and not hasattr(model.embedding, "position_embeddings")
    # Untied: the output projection is its own parameter.
    assert not model.share_embeddings_and_output_weights
    assert "output_layer.weight" in names
    assert (
        names["output_layer.weight"].data_ptr()
        != names["embedding.word_embeddings.weight"].data_ptr()
    )
    assert model.embedding.word_embeddings.weight.shape[0] == workers.VOCAB // tp
    destroy_distributed()


@pytest.mark.parametrize("tp", [1, 2])
def test_llama_structure(tp):
    run_ranks(structure_worker, tp, tp)
