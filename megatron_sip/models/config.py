"""Model architecture settings, with Megatron-LM's flag names and defaults.

A Llama-style model is ``--normalization RMSNorm --swiglu --position-embedding-type rope
--group-query-attention --num-query-groups G --untie-embeddings-and-output-weights
--disable-bias-linear --hidden-dropout 0 --attention-dropout 0`` (see examples/).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Literal, Optional

from megatron_sip.errors import ConfigError, require_choice, require_positive


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


@dataclasses.dataclass
class ModelConfig:
    """Transformer architecture."""

    num_layers: Optional[int] = None
    """Number of transformer layers (required)."""

    hidden_size: Optional[int] = None
    """Transformer hidden size (required)."""

    ffn_hidden_size: Optional[int] = None
    """MLP hidden size. Default: 4 x hidden size, or with --swiglu Megatron's 2/3 of that rounded
    down to a multiple of 64."""

    num_attention_heads: Optional[int] = None
    """Number of attention heads (required)."""

    group_query_attention: bool = False
    """Use grouped-query attention with --num-query-groups key/value heads."""

    num_query_groups: Optional[int] = None
    """Number of key/value head groups with --group-query-attention."""

    seq_length: Optional[int] = None
    """Maximum sequence length processed (required)."""

    max_position_embeddings: Optional[int] = None
    """Longest sequence the model takes: the size of the learned position table (default
    --seq-length), and with rope the bound that --seq-length and generation lengths are checked
    against (default: none)."""

    position_embedding_type: Literal["learned_absolute", "rope", "none"] = "learned_absolute"
    """Position embedding: learned_absolute (GPT-2), rope (Llama) or none."""

    rotary_base: int = 10000
    """RoPE base period (with --position-embedding-type rope)."""

    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates (with --position-embedding-type
    rope)."""

    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    """Normalisation layer: LayerNorm (GPT-2) or RMSNorm (Llama)."""

    norm_epsilon: float = 1e-5
    """Epsilon of the normalisation layers."""

    swiglu: bool = False
    """SwiGLU MLP (gated SiLU) instead of GeLU."""

    untie_embeddings_and_output_weights: bool = False
    """Separate input embedding and output projection weights (Llama)."""

    disable_bias_linear: bool = False
    """No biases in linear layers (Llama)."""

    hidden_dropout: float = 0.1
    """Dropout probability on the transformer hidden states."""

    attention_dropout: float = 0.1
    """Dropout probability on the attention weights."""

    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: local (Megatron-Core modules, runs on CPU), transformer_engine
    (TE fused modules, GPU), or auto (TE when it is importable and the device is a GPU)."""

    def __post_init__(self):
        for flag, value in (
            ("--num-layers", self.num_layers),
            ("--hidden-size", self.hidden_size),
            ("--num-attention-heads", self.num_attention_heads),
            ("--seq-length", self.seq_length),
        ):
            if value is None:
                raise ConfigError(flag, "is required")
            require_positive(flag, value)
        require_choice(
            "--position-embedding-type",
            self.position_embedding_type,
            ("learned_absolute", "rope", "none"),
        )
        require_choice("--normalization", self.normalization, ("LayerNorm", "RMSNorm"))
        require_choice(
            "--transformer-impl", self.transformer_impl, ("auto", "local", "transformer_engine")
        )
        if self.transformer_impl == "transformer_engine" and not transformer_engine_available():
            raise ConfigError(
                "--transformer-impl",
                "transformer_engine was requested but Transformer Engine is not installed; "
                "install the [gpu] extra or use --transformer-impl local",
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                "--num-attention-heads",
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}",
            )
        if self.position_embedding_type != "rope":
            for flag, value, default in (
                ("--rotary-base", self.rotary_base, 10000),
                ("--rotary-percent", self.rotary_percent, 1.0),
            ):
                if value != default:
                    raise ConfigError(flag, "only applies to --position-embedding-type rope")
        if self.num_query_groups and not self.group_query_attention:
            raise ConfigError(
                "--num-query-groups", "needs --group-query-attention (as in Megatron-LM)"
            )
        if self.group_query_attention:
            if not self.num_query_groups:
                raise ConfigError(
                    "--num-query-groups", "--group-query-attention needs --num-query-groups G"
                )
            if self.num_attention_heads % self.num_query_groups:
                raise ConfigError(
                    "--num-query-groups",
                    f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                    f"--num-query-groups {self.num_query_groups}",
                )
        limit = self.seq_length_limit()
        if limit is not None and limit < self.seq_length:
            raise ConfigError(
                "--max-position-embeddings",
                f"{limit} is smaller than --seq-length {self.seq_length}; "
                "raise --max-position-embeddings",
            )
        if self.ffn_size() <= 0:
            raise ConfigError("--ffn-hidden-size", "must be positive; set it explicitly")

    def query_groups(self) -> int:
        """Key/value heads: --num-query-groups with GQA, else one per attention head."""
        return self.num_query_groups if self.group_query_attention else self.num_attention_heads

    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:
            return int(4 * self.hidden_size * 2 / 3 / 64) * 64
        return 4 * self.hidden_size

    def seq_length_limit(self) -> Optional[int]:
        """Longest sequence the model takes (None: no bound, rope or no position embedding
        without --max-position-embeddings)."""
        if self.position_embedding_type == "learned_absolute":
            return self.max_position_embeddings or self.seq_length
        return self.max_position_embeddings

    def use_transformer_engine(self, device: str) -> bool:
        if self.transformer_impl == "auto":
            return device == "cuda" and transformer_engine_available()
        return self.transformer_impl == "transformer_engine"
