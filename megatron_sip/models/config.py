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

    use_rope_scaling: bool = False
    """Llama 3.1's RoPE frequency scaling (with --position-embedding-type rope), as Megatron-Core
    applies it: wavelengths longer than the original 8192-token context are divided by
    --rope-scaling-factor, shorter than 8192/4 kept, those between interpolated (low- and
    high-frequency factors 1 and 4)."""

    rope_scaling_factor: float = 8.0
    """RoPE scaling factor with --use-rope-scaling (Llama 3.1: 8, Llama 3.2: 32)."""

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

    add_qkv_bias: bool = False
    """Biases on the query, key and value projections even with --disable-bias-linear
    (Qwen2/2.5)."""

    qk_layernorm: bool = False
    """Normalise each head's queries and keys (with --normalization's norm over the head
    dimension) before RoPE (Qwen3)."""

    hidden_dropout: float = 0.1
    """Dropout probability on the transformer hidden states."""

    attention_dropout: float = 0.1
    """Dropout probability on the attention weights."""

    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: local (Megatron-Core modules, runs on CPU), transformer_engine
    (TE fused modules, GPU), or auto (TE when it is importable and the device is a GPU)."""

    kv_channels: Optional[int] = None
    """Dimension of each attention head's queries, keys and values (default: --hidden-size /
    --num-attention-heads)."""

    apply_layernorm_1p: bool = False
    """Zero-centred gamma (Megatron-Core's layernorm_zero_centered_gamma): each norm stores
    gamma - 1, initialised to 0, and applies 1 + weight, so weight decay pulls gamma to 1."""

    attention_backend: Literal["flash", "fused", "unfused", "local", "auto"] = "auto"
    """Attention kernel (Megatron-Core's AttnBackend): flash, fused or unfused select Transformer
    Engine's kernels, auto lets Transformer Engine choose, local is Megatron-Core's own
    DotProductAttention. With the local layer spec (CPU) attention is always that unfused
    DotProductAttention, so local, unfused and auto apply and flash and fused are refused."""

    cross_entropy_loss_fusion: bool = False
    """Fused vocabulary-parallel cross entropy for the pretraining loss (GPU only)."""

    cross_entropy_fusion_impl: Literal["native", "te"] = "native"
    """Fused cross entropy implementation: native (Megatron-Core's) or te (Transformer
    Engine's)."""

    use_mcore_models: bool = False
    """Accepted for Megatron-LM scripts (deprecated there): megatron-sip always builds
    Megatron-Core models."""

    recompute_activations: bool = False
    """Selective activation recomputation (same as --recompute-granularity selective)."""

    recompute_granularity: Optional[Literal["full", "selective"]] = None
    """Activation recomputation: full recomputes whole transformer layers (with
    --recompute-method and --recompute-num-layers), selective the --recompute-modules."""

    recompute_method: Optional[Literal["uniform", "block"]] = None
    """With full recompute: uniform recomputes every chunk of --recompute-num-layers layers,
    block the first --recompute-num-layers layers of each pipeline stage."""

    recompute_num_layers: Optional[int] = None
    """Layers per recomputed chunk (uniform) or recomputed layers per pipeline stage (block)."""

    recompute_modules: Optional[list[str]] = None
    """Submodules that selective recompute recomputes (Megatron-Core's default: core_attn;
    also layernorm, mlp)."""

    fp8_format: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 training through Transformer Engine: e4m3 everywhere, or hybrid (e5m2 gradients)."""

    fp8_recipe: Literal["tensorwise", "delayed", "mxfp8", "blockwise"] = "delayed"
    """FP8 scaling recipe (with --fp8-format)."""

    fp8_amax_history_len: int = 1
    """Length of the amax history of delayed FP8 scaling."""

    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"
    """How delayed FP8 scaling picks the amax from its history."""

    fp8_param_gather: bool = False
    """Keep the parameters in FP8 and all-gather them in FP8 (with --fp8-format)."""

    masked_softmax_fusion: bool = True
    """Fused scale, mask and softmax kernel (GPU; the CPU runs the unfused softmax)."""

    bias_gelu_fusion: bool = True
    """Fused bias and GeLU kernel (GPU; Megatron-LM turns it off without linear biases)."""

    bias_swiglu_fusion: bool = True
    """Fused bias and SwiGLU kernel with --swiglu (GPU)."""

    bias_dropout_fusion: bool = True
    """Fused bias, dropout and residual add (GPU)."""

    apply_rope_fusion: bool = dataclasses.field(default=True, metadata={"flag": "--rope-fusion"})
    """Fused RoPE kernel with --position-embedding-type rope (GPU, Transformer Engine)."""

    gradient_accumulation_fusion: bool = True
    """Fuse weight-gradient accumulation into the linear layers' backward (GPU, apex)."""

    persist_layer_norm: bool = True
    """apex's persistent fused LayerNorm kernel where the hidden size allows it (GPU)."""

    flash_decode: bool = False
    """Decode (rollouts, generation) with flash-attn's KV-cache kernel: each new key is rotated
    once before it is cached, instead of RoPE applied to the whole key cache at every token (GPU:
    needs flash-attn; always on on the CPU, where megatron_sip.platform supplies the kernel)."""

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
        if self.kv_channels is not None:
            require_positive("--kv-channels", self.kv_channels)
        elif self.hidden_size % self.num_attention_heads:
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
        if self.use_rope_scaling and self.position_embedding_type != "rope":
            raise ConfigError(
                "--use-rope-scaling", "only applies to --position-embedding-type rope"
            )
        if self.rope_scaling_factor != 8.0 and not self.use_rope_scaling:
            raise ConfigError("--rope-scaling-factor", "only applies with --use-rope-scaling")
        if self.use_rope_scaling and self.rope_scaling_factor <= 0:
            raise ConfigError(
                "--rope-scaling-factor", f"must be positive, got {self.rope_scaling_factor}"
            )
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
        require_choice(
            "--attention-backend",
            self.attention_backend,
            ("flash", "fused", "unfused", "local", "auto"),
        )
        require_choice(
            "--cross-entropy-fusion-impl", self.cross_entropy_fusion_impl, ("native", "te")
        )
        self._validate_recompute()
        self._validate_fp8()
        limit = self.seq_length_limit()
        if limit is not None and limit < self.seq_length:
            raise ConfigError(
                "--max-position-embeddings",
                f"{limit} is smaller than --seq-length {self.seq_length}; "
                "raise --max-position-embeddings",
            )
        if self.ffn_size() <= 0:
            raise ConfigError("--ffn-hidden-size", "must be positive; set it explicitly")

    def _validate_recompute(self) -> None:
        if self.recompute_activations:
            # As Megatron-LM: --recompute-activations means selective recompute.
            if self.recompute_granularity not in (None, "selective"):
                raise ConfigError(
                    "--recompute-activations",
                    f"means --recompute-granularity selective, but --recompute-granularity "
                    f"{self.recompute_granularity} was given; pass one of them",
                )
            self.recompute_granularity = "selective"
        if self.recompute_granularity is not None:
            require_choice(
                "--recompute-granularity", self.recompute_granularity, ("full", "selective")
            )
        if self.recompute_method is not None:
            require_choice("--recompute-method", self.recompute_method, ("uniform", "block"))
        if self.recompute_granularity is None:
            for flag, value in (
                ("--recompute-method", self.recompute_method),
                ("--recompute-num-layers", self.recompute_num_layers),
                ("--recompute-modules", self.recompute_modules),
            ):
                if value is not None:
                    raise ConfigError(flag, "needs --recompute-granularity full or selective")
        elif self.recompute_granularity == "full":
            if self.recompute_method is None or self.recompute_num_layers is None:
                raise ConfigError(
                    "--recompute-granularity",
                    "full recompute needs --recompute-method uniform|block and "
                    "--recompute-num-layers N",
                )
            require_positive("--recompute-num-layers", self.recompute_num_layers)
            if self.recompute_modules is not None:
                raise ConfigError(
                    "--recompute-modules", "applies to --recompute-granularity selective only"
                )
        else:
            for flag, value in (
                ("--recompute-method", self.recompute_method),
                ("--recompute-num-layers", self.recompute_num_layers),
            ):
                if value is not None:
                    raise ConfigError(
                        flag, "applies to --recompute-granularity full only (as in Megatron-LM)"
                    )
            allowed = ("core_attn", "layernorm", "mlp")
            for module in self.recompute_modules or ():
                require_choice("--recompute-modules", module, allowed)

    def _validate_fp8(self) -> None:
        if self.fp8_format is not None:
            require_choice("--fp8-format", self.fp8_format, ("e4m3", "hybrid"))
        require_choice(
            "--fp8-recipe", self.fp8_recipe, ("tensorwise", "delayed", "mxfp8", "blockwise")
        )
        require_choice(
            "--fp8-amax-compute-algo", self.fp8_amax_compute_algo, ("most_recent", "max")
        )
        require_positive("--fp8-amax-history-len", self.fp8_amax_history_len)
        if self.fp8_format is None:
            for flag, value, default in self._fp8_settings():
                if value != default:
                    raise ConfigError(flag, "only applies with --fp8-format e4m3|hybrid")

    def _fp8_settings(self):
        return (
            ("--fp8-recipe", self.fp8_recipe, "delayed"),
            ("--fp8-amax-history-len", self.fp8_amax_history_len, 1),
            ("--fp8-amax-compute-algo", self.fp8_amax_compute_algo, "most_recent"),
            ("--fp8-param-gather", self.fp8_param_gather, False),
        )

    def check_device(self, device: str) -> None:
        """Refuses, naming the flag, what cannot run on ``device`` (cpu or cuda) with the layer
        implementation it selects."""
        te = self.use_transformer_engine(device)
        if not te:
            where = "on the CPU" if device == "cpu" else "without Transformer Engine"
            if self.fp8_format is not None:
                raise ConfigError(
                    "--fp8-format",
                    f"FP8 runs through Transformer Engine on a GPU; it cannot run {where} "
                    "(the local layer spec); drop the --fp8-* flags",
                )
            if self.attention_backend in ("flash", "fused"):
                raise ConfigError(
                    "--attention-backend",
                    f"{self.attention_backend} selects a Transformer Engine attention kernel; "
                    f"{where} attention is Megatron-Core's unfused DotProductAttention: use "
                    "--attention-backend auto, local or unfused",
                )
            if "layernorm" in (self.recompute_modules or ()):
                raise ConfigError(
                    "--recompute-modules",
                    "layernorm recompute uses Megatron-Core's output-discarding checkpoint, "
                    f"which needs Transformer Engine; it cannot run {where}: recompute core_attn "
                    "or mlp",
                )
            if self.cross_entropy_loss_fusion and (
                device == "cpu" or self.cross_entropy_fusion_impl == "te"
            ):
                raise ConfigError(
                    "--cross-entropy-loss-fusion",
                    "the fused cross entropy is a GPU kernel fusion (torch.compile for native, "
                    f"Transformer Engine for te); it cannot run {where}. The unfused "
                    "vocabulary-parallel cross entropy computes the same loss: drop the flag",
                )
        elif self.attention_backend == "local":
            raise ConfigError(
                "--attention-backend",
                "local is Megatron-Core's own attention, which the Transformer Engine layer spec "
                "does not use (as in Megatron-LM): pass --transformer-impl local with it, or "
                "pick flash, fused, unfused or auto",
            )

    def fusions(self) -> dict[str, bool]:
        """TransformerConfig's fusion switches as Megatron-LM derives them from its flags."""
        return {
            "gradient_accumulation_fusion": self.gradient_accumulation_fusion,
            # As Megatron-LM: the bias-activation fusion follows --no-bias-swiglu-fusion with
            # SwiGLU, else --no-bias-gelu-fusion (off without linear biases).
            "bias_activation_fusion": self.bias_swiglu_fusion
            if self.swiglu
            else self.bias_gelu_fusion and not self.disable_bias_linear,
            "bias_dropout_fusion": self.bias_dropout_fusion,
            "masked_softmax_fusion": self.masked_softmax_fusion,
            "apply_rope_fusion": self.apply_rope_fusion and self.position_embedding_type == "rope",
            "persist_layer_norm": self.persist_layer_norm,
            "flash_decode": self.flash_decode,
        }

    def head_dim(self) -> int:
        """Dimension of each attention head (--kv-channels, else hidden size / heads)."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

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
