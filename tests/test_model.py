"""The Llama-style GPTModel: RMSNorm, SwiGLU, RoPE, GQA, untied embeddings, no biases."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.enums import AttnBackend

from megatron_sip import platform
from megatron_sip.errors import ConfigError
from megatron_sip.initialize import destroy_distributed
from megatron_sip.models.checkpointing import unwrap_model
from megatron_sip.platform import LocalNorm

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
    for norm in (layer.input_layernorm, layer.pre_mlp_layernorm, model.decoder.final_layernorm):
        assert isinstance(norm, LocalNorm) and norm.rms and norm.bias is None
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


RECOMPUTE = {
    "full uniform": dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=2),
    "full block": dict(recompute_granularity="full", recompute_method="block",
                       recompute_num_layers=3),
    "selective": dict(recompute_activations=True, recompute_modules=["core_attn", "mlp"]),
}  # fmt: skip


def recompute_worker() -> None:
    parallel, context = workers.setup()
    batch = workers.fixed_batch()
    chunks, _ = workers.build(parallel, context)
    weights = {k: v for k, v in unwrap_model(chunks[0]).state_dict().items() if v is not None}
    _, loss = workers.logits_and_loss(chunks, batch, forward_only=False)
    grads = workers.named_grads(chunks)
    for name, settings in RECOMPUTE.items():
        recomputed, config = workers.build(parallel, context, workers.tiny_llama(**settings))
        assert config.recompute_granularity == settings.get("recompute_granularity", "selective")
        layers = unwrap_model(recomputed[0]).decoder.layers
        if config.recompute_granularity == "selective":
            assert all(layer.recompute_mlp for layer in layers)
        unwrap_model(recomputed[0]).load_state_dict(weights, strict=False)
        _, recomputed_loss = workers.logits_and_loss(recomputed, batch, forward_only=False)
        assert recomputed_loss == pytest.approx(loss, abs=1e-6), name
        for param, grad in workers.named_grads(recomputed).items():
            torch.testing.assert_close(grad, grads[param], atol=1e-6, rtol=1e-6, msg=name)
    destroy_distributed()


def test_recompute_gives_the_same_loss_and_gradients():
    """Full (uniform, block) and selective activation recomputation change memory, not math."""
    run_ranks(recompute_worker, 1)


# ---- Megatron-LM's model flags ----------------------------------------------------------------

SHAPE = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--position-embedding-type", "rope", "--swiglu",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
]  # fmt: skip


def _model(*flags, world_size=1, for_this_device=True):
    from megatron_sip.arguments import parse_args

    return parse_args(
        [*SHAPE, *flags], world_size=world_size, exit_on_error=False,
        for_this_device=for_this_device,
    )  # fmt: skip


def test_model_flags_reach_transformer_config(cpu_platform):
    from megatron_sip.models.gpt import transformer_config

    config = _model(
        "--kv-channels", "32", "--apply-layernorm-1p", "--attention-backend", "unfused",
        "--use-mcore-models", "--recompute-granularity", "full", "--recompute-method", "block",
        "--recompute-num-layers", "1", "--no-rope-fusion", "--no-masked-softmax-fusion",
        "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
        "--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
    )  # fmt: skip
    layers = transformer_config(config.model, config.parallel)
    assert layers.kv_channels == 32 and layers.layernorm_zero_centered_gamma
    assert layers.attention_backend == AttnBackend.unfused
    assert (layers.recompute_granularity, layers.recompute_method) == ("full", "block")
    assert layers.recompute_num_layers == 1
    assert not any(getattr(layers, name) for name in platform.FUSIONS)
    # --recompute-activations is Megatron-LM's shorthand for selective recompute.
    selective = transformer_config(_model("--recompute-activations").model, config.parallel)
    assert selective.recompute_granularity == "selective"
    assert selective.recompute_modules == ["core_attn"]


def test_fusions_follow_megatron_lm_on_a_gpu(cpu_platform, monkeypatch):
    """On a GPU the fusion flags are Megatron-LM's (on unless --no-...), and a fusion whose kernel
    is missing is refused by name before Megatron-Core fails inside the model."""
    monkeypatch.setattr(platform, "_active", "cuda")
    from megatron.core.tensor_parallel import layers

    if not layers._grad_accum_fusion_available:  # no apex here
        model = _model("--transformer-impl", "local").model
        with pytest.raises(ConfigError, match="--no-gradient-accumulation-fusion"):
            platform.model_config_overrides(model.fusions())
    model = _model("--no-gradient-accumulation-fusion", "--no-rope-fusion").model
    settings = platform.model_config_overrides(model.fusions())
    assert settings == {
        "gradient_accumulation_fusion": False, "bias_activation_fusion": True,
        "bias_dropout_fusion": True, "masked_softmax_fusion": True, "apply_rope_fusion": False,
        "persist_layer_norm": True, "flash_decode": False,
    }  # fmt: skip
    from megatron.core.transformer import attention

    monkeypatch.setattr(attention, "flash_attn_with_kvcache", None)  # a GPU without flash-attn
    with pytest.raises(ConfigError, match="--flash-decode"):
        platform.model_config_overrides(_model("--flash-decode").model.fusions())
    with pytest.raises(ConfigError, match="--fp8-format: FP8 runs through Transformer Engine"):
        _model(
            "--fp8-format", "hybrid", "--transformer-impl", "local", for_this_device=False
        ).model.check_device("cuda")  # fmt: skip


@pytest.mark.parametrize(
    "flags,flag,fragment",
    [
        (["--fp8-format", "hybrid"], "--fp8-format", "cannot run on the CPU"),
        (["--fp8-format", "e4m3", "--fp8-param-gather"], "--fp8-format", "Transformer Engine"),
        (["--attention-backend", "fused"], "--attention-backend", "use --attention-backend auto"),
        (["--attention-backend", "flash"], "--attention-backend", "Transformer Engine"),
        (["--cross-entropy-loss-fusion"], "--cross-entropy-loss-fusion", "cannot run on the CPU"),
        (["--recompute-activations", "--recompute-modules", "layernorm"],
         "--recompute-modules", "needs Transformer Engine"),
    ],
)  # fmt: skip
def test_model_flags_the_cpu_cannot_run_are_refused(cpu_platform, flags, flag, fragment):
    from megatron_sip.models.gpt import transformer_config

    # Refused while parsing, for the device --device resolves to (here the CPU) ...
    with pytest.raises(ConfigError) as error:
        _model(*flags)
    assert error.value.flag == flag and fragment in str(error.value)
    # ... and again when a model is built from settings checked for another device.
    config = _model(*flags, for_this_device=False)
    with pytest.raises(ConfigError) as error:
        transformer_config(config.model, config.parallel)
    assert error.value.flag == flag and fragment in str(error.value)


@pytest.mark.parametrize("backend", ["auto", "local", "unfused"])
def test_attention_backends_of_the_local_spec_are_accepted(cpu_platform, backend):
    _model("--attention-backend", backend).model.check_device("cpu")


@pytest.mark.parametrize(
    "flags,flag,fragment",
    [
        (["--fp8-amax-history-len", "1024"], "--fp8-amax-history-len", "--fp8-format"),
        (["--fp8-param-gather"], "--fp8-param-gather", "--fp8-format"),
        (["--recompute-granularity", "full"], "--recompute-granularity", "--recompute-method"),
        (["--recompute-method", "uniform"], "--recompute-method", "--recompute-granularity"),
        (["--recompute-activations", "--recompute-num-layers", "1"], "--recompute-num-layers",
         "full only"),
        (["--recompute-activations", "--recompute-granularity", "full"],
         "--recompute-activations", "selective"),
        (["--attention-backend", "sdpa"], "--attention-backend", "choose one of"),
        (["--num-layers-per-virtual-pipeline-stage", "1"],
         "--num-layers-per-virtual-pipeline-stage", "interleaved pipeline schedule not"),
        (["--virtual-pipeline-model-parallel-size", "2"],
         "--virtual-pipeline-model-parallel-size", "interleaved pipeline schedule not"),
    ],
)  # fmt: skip
def test_bad_model_flags_name_the_flag(flags, flag, fragment):
    with pytest.raises(ConfigError) as error:
        _model(*flags)
    assert error.value.flag == flag and fragment in str(error.value)
