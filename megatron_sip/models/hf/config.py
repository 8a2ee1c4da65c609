"""A Hugging Face ``config.json`` <-> the Megatron-LM model flags (:class:`ModelConfig`).

Four architectures map onto Megatron-Core's GPTModel with no model code of our own: Llama
(Llama 2, 3, and 3.1/3.2's RoPE scaling), Mistral without sliding-window attention, Qwen2/2.5
(biases on the query/key/value projections) and Qwen3 (per-head query/key RMSNorm). Every
``config.json`` field that would change the network's math is read and either mapped to a flag or
refused by name; a field that only describes the file (token ids, dtype, cache use) is kept for
the export.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

from megatron_sip.errors import ConfigError
from megatron_sip.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What distinguishes a supported ``architectures`` entry from Llama's math."""

    name: str
    model_type: str
    qkv_bias: bool  # biases on q/k/v projections (only)
    qk_layernorm: bool  # RMSNorm over each head's queries and keys
    families: str  # for the documentation table


ARCHITECTURES = {
    arch.name: arch
    for arch in (
        Architecture("LlamaForCausalLM", "llama", False, False, "Llama 2, 3, 3.1, 3.2"),
        Architecture("MistralForCausalLM", "mistral", False, False, "Mistral (no sliding window)"),
        Architecture("Qwen2ForCausalLM", "qwen2", True, False, "Qwen2, Qwen2.5"),
        Architecture("Qwen3ForCausalLM", "qwen3", False, True, "Qwen3 (dense)"),
    )
}

# Llama 3.1's RoPE scaling as Megatron-Core applies it (its low/high frequency factors and
# original context are fixed; only the factor is a setting).
LLAMA3_ROPE_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Default training length of an imported model when --seq-length is not given.
DEFAULT_SEQ_LENGTH = 4096


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(str(path), f"cannot be read as JSON ({error})") from error
    if not isinstance(value, dict):
        raise ConfigError(str(path), "is not a JSON object")
    return value


class _Fields:
    """Reads fields of one ``config.json``; each error names the file and the field."""

    def __init__(self, config: dict, path: str):
        self.config, self.path = config, path

    def error(self, field: str, message: str) -> ConfigError:
        return ConfigError(self.path, f"{field}: {message}")

    def require(self, field: str, kind=int):
        value = self.config.get(field)
        if value is None:
            raise self.error(field, "missing; a causal LM's config.json must set it")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise self.error(field, f"must be a positive integer, got {value!r}")
        if kind is float and not isinstance(value, (int, float)):
            raise self.error(field, f"must be a number, got {value!r}")
        return value

    def must_be(self, field: str, allowed: tuple, why: str) -> None:
        value = self.config.get(field, allowed[0])
        if value not in allowed:
            raise self.error(field, f"{value!r} is not supported: {why}")


def architecture(config: dict, path: str) -> Architecture:
    """The supported architecture ``config.json`` names (exactly one), else a ConfigError."""
    fields = _Fields(config, path)
    names = config.get("architectures")
    if not isinstance(names, list) or len(names) != 1:
        raise fields.error("architectures", f"expected one architecture name, got {names!r}")
    arch = ARCHITECTURES.get(names[0])
    if arch is None:
        raise fields.error(
            "architectures",
            f"{names[0]} is not supported; supported: {', '.join(ARCHITECTURES)}",
        )
    model_type = config.get("model_type", arch.model_type)
    if model_type != arch.model_type:
        raise fields.error(
            "model_type", f"{model_type!r} does not match {arch.name} ({arch.model_type!r})"
        )
    return arch


def _rope(config: dict) -> tuple[Any, Optional[dict], str]:
    """(rope theta, scaling settings or None, the field holding them) from transformers 5's
    ``rope_parameters`` or transformers 4's ``rope_theta`` / ``rope_scaling``."""
    parameters = config.get("rope_parameters")
    if isinstance(parameters, dict):
        scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
        return parameters.get("rope_theta", 10000.0), scaling, "rope_parameters"
    return config.get("rope_theta", 10000.0), config.get("rope_scaling"), "rope_scaling"


def model_flags_from_hf(
    config: dict, path: str, *, seq_length: Optional[int] = None
) -> dict[str, Any]:
    """The :class:`ModelConfig` settings of a supported Hugging Face ``config.json`` (``path``
    names it in errors). ``seq_length`` defaults to the model's context, at most 4096."""
    arch = architecture(config, path)
    fields = _Fields(config, path)
    hidden = fields.require("hidden_size")
    heads = fields.require("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise fields.error(
            "num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}"
        )
    head_dim = config.get("head_dim") or None
    if head_dim is None and hidden % heads:
        raise fields.error("head_dim", f"missing, and hidden_size {hidden} % heads {heads} != 0")
    fields.must_be("hidden_act", ("silu",), "the MLP is SwiGLU (gated SiLU)")
    fields.must_be("mlp_bias", (False,), "Megatron's MLP has biases on both layers or neither")
    if arch.model_type != "qwen2":
        fields.must_be(
            "attention_bias",
            (False,),
            "it adds a bias to the output projection too; only Qwen2's q/k/v biases map",
        )
    if arch.model_type == "mistral":
        fields.must_be(
            "sliding_window", (None,), "sliding-window attention has no Megatron-Core equivalent"
        )
    else:
        fields.must_be(
            "use_sliding_window",
            (False,),
            "sliding-window attention has no Megatron-Core equivalent",
        )
    layer_types = config.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise fields.error(
            "layer_types",
            "has layers other than full_attention (sliding-window attention is not supported)",
        )
    fields.must_be("partial_rotary_factor", (1.0, 1), "RoPE must rotate whole heads")
    theta, scaling, scaling_field = _rope(config)
    if not isinstance(theta, (int, float)) or float(theta) != int(theta) or theta <= 0:
        raise fields.error("rope_theta", f"{theta!r}: --rotary-base takes a positive integer")
    use_rope_scaling, factor = False, 8.0
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "llama3":
        for key, expected in LLAMA3_ROPE_FIXED.items():
            if float(scaling.get(key, expected)) != float(expected):
                raise fields.error(
                    f"{scaling_field}.{key}",
                    f"{scaling.get(key)!r}: Megatron-Core's Llama 3 RoPE scaling fixes it to "
                    f"{expected}",
                )
        use_rope_scaling, factor = True, float(scaling.get("factor", 8.0))
    elif rope_type != "default":
        raise fields.error(
            f"{scaling_field}.rope_type",
            f"{rope_type!r} is not supported (only the default RoPE and Llama 3's 'llama3' "
            "scaling map onto Megatron-Core)",
        )
    max_positions = fields.require("max_position_embeddings")
    if seq_length is None:
        seq_length = min(max_positions, DEFAULT_SEQ_LENGTH)
    group_query_attention = kv_heads != heads
    return dict(
        num_layers=fields.require("num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=fields.require("intermediate_size"),
        num_attention_heads=heads,
        group_query_attention=group_query_attention,
        num_query_groups=kv_heads if group_query_attention else None,
        kv_channels=head_dim if head_dim and head_dim * heads != hidden else None,
        seq_length=seq_length,
        max_position_embeddings=max_positions,
        position_embedding_type="rope",
        rotary_base=int(theta),
        use_rope_scaling=use_rope_scaling,
        rope_scaling_factor=factor,
        normalization="RMSNorm",
        norm_epsilon=float(fields.require("rms_norm_eps", float)),
        swiglu=True,
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        disable_bias_linear=True,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=float(config.get("attention_dropout", 0.0) or 0.0),
        init_method_std=float(config.get("initializer_range", 0.02)),
    )


def _exportable(model: ModelConfig) -> Architecture:
    """The Hugging Face architecture that computes what ``model`` computes, or a ConfigError
    naming the flag that no supported architecture has."""
    unsupported = (
        ("--normalization", model.normalization != "RMSNorm", "RMSNorm"),
        ("--swiglu", not model.swiglu, "a SwiGLU MLP"),
        ("--position-embedding-type", model.position_embedding_type != "rope", "RoPE"),
        ("--rotary-percent", model.rotary_percent != 1.0, "RoPE over whole heads"),
        ("--apply-layernorm-1p", model.apply_layernorm_1p, "plain (not zero-centred) norms"),
        ("--disable-bias-linear", not model.disable_bias_linear, "no linear biases"),
    )
    for flag, bad, needed in unsupported:
        if bad:
            raise ConfigError(
                flag,
                f"the checkpoint's model cannot be exported: Llama, Mistral and Qwen need {needed}",
            )
    if model.qk_layernorm and model.add_qkv_bias:
        raise ConfigError(
            "--add-qkv-bias", "with --qk-layernorm matches no supported Hugging Face architecture"
        )
    if model.qk_layernorm:
        return ARCHITECTURES["Qwen3ForCausalLM"]
    if model.add_qkv_bias:
        return ARCHITECTURES["Qwen2ForCausalLM"]
    return ARCHITECTURES["LlamaForCausalLM"]


# Fields the export sets from the model flags; a saved config.json's other fields are kept.
_MATH_FIELDS = (
    "architectures",
    "model_type",
    "transformers_version",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "torch_dtype",
    "dtype",
    "head_dim",
    "num_key_value_heads",
    "sliding_window",
    "use_sliding_window",
    "layer_types",
    "max_window_layers",
)


def hf_config_from_model(
    model: ModelConfig,
    vocab_size: int,
    *,
    dtype: str,
    saved: Optional[dict] = None,
    token_ids: Optional[dict] = None,
):
    """The ``transformers`` config of ``model`` (a ``PretrainedConfig`` of the installed
    transformers version): the architecture a saved ``config.json`` (``saved``, kept with an
    imported checkpoint) names when it still fits, else the one the flags imply; math from the
    flags, other fields (token ids, ...) from ``saved`` or ``token_ids``."""
    from transformers import AutoConfig

    arch = _exportable(model)
    if saved is not None:
        named = ARCHITECTURES.get((saved.get("architectures") or [None])[0])
        if named is not None and (named.qkv_bias, named.qk_layernorm) == (
            arch.qkv_bias,
            arch.qk_layernorm,
        ):
            arch = named
    kept = {k: v for k, v in (saved or token_ids or {}).items() if k not in _MATH_FIELDS}
    rope_scaling = None
    if model.use_rope_scaling:
        rope_scaling = {"rope_type": "llama3", "factor": model.rope_scaling_factor}
        rope_scaling.update(LLAMA3_ROPE_FIXED)
    math = dict(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_size(),
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.query_groups(),
        head_dim=model.head_dim(),
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        rms_norm_eps=model.norm_epsilon,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        rope_theta=float(model.rotary_base),
        rope_scaling=rope_scaling,
        hidden_act="silu",
        attention_dropout=model.attention_dropout,
        initializer_range=model.init_method_std,
    )
    if arch.model_type != "qwen2":
        math["attention_bias"] = False
    if arch.model_type in ("llama", "mistral"):
        math["mlp_bias"] = False
    if arch.model_type == "mistral":
        math["sliding_window"] = None
    if arch.model_type in ("qwen2", "qwen3"):
        math["use_sliding_window"] = False
    config = AutoConfig.for_model(arch.model_type, **{**kept, **math})
    config.architectures = [arch.name]
    config.dtype = dtype
    return config
