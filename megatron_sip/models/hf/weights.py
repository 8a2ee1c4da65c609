"""Tensor names and layouts: Hugging Face's Llama/Mistral/Qwen modules <-> Megatron-Core's GPTModel,
and the safetensors files on both sides of a conversion.

Megatron tensors here are *global* (the whole tensor as at TP=1, vocabulary unpadded); each rank's
tensor-parallel slice is cut from it by :func:`tensor_parallel_slice`. Megatron-Core fuses what
Hugging Face keeps apart: ``linear_qkv`` holds, for each key/value group in turn, that group's
query heads, then its key head, then its value head (so a tensor-parallel slice is whole groups),
and ``linear_fc1`` holds the SwiGLU gate projection above the up projection. RoPE needs no
permutation: both rotate the two halves of each head.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from megatron_sip.errors import ConfigError
from megatron_sip.models.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class LayerTensor:
    """One Megatron tensor of a transformer layer and the Hugging Face tensors it is made of."""

    megatron: str  # parameter name under decoder.layers.<i> (Megatron-Core's local layer spec)
    checkpoint: str  # key under decoder.layers in a torch_dist checkpoint (stacked over layers)
    hf: tuple[str, ...]  # names under model.layers.<i>
    kind: str = "copy"  # copy | qkv (q, k, v fused by group) | gated (gate over up)


def layer_tensors(model: ModelConfig) -> list[LayerTensor]:
    """The tensors of one transformer layer of ``model``."""
    attention = "self_attention"
    tensors = [
        # Megatron-Core stores the local spec's norms under Transformer Engine's fused names.
        LayerTensor(
            "input_layernorm.weight",
            f"{attention}.linear_qkv.layer_norm_weight",
            ("input_layernorm.weight",),
        ),
        LayerTensor(
            f"{attention}.linear_qkv.weight",
            f"{attention}.linear_qkv.weight",
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            "qkv",
        ),
        LayerTensor(
            f"{attention}.linear_proj.weight",
            f"{attention}.linear_proj.weight",
            ("self_attn.o_proj.weight",),
        ),
        LayerTensor(
            "pre_mlp_layernorm.weight",
            "mlp.linear_fc1.layer_norm_weight",
            ("post_attention_layernorm.weight",),
        ),
        LayerTensor(
            "mlp.linear_fc1.weight",
            "mlp.linear_fc1.weight",
            ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
            "gated",
        ),
        LayerTensor("mlp.linear_fc2.weight", "mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
    ]
    if model.add_qkv_bias:
        tensors.append(
            LayerTensor(
                f"{attention}.linear_qkv.bias",
                f"{attention}.linear_qkv.bias",
                ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
                "qkv",
            )
        )
    if model.qk_layernorm:
        tensors += [
            LayerTensor(
                f"{attention}.q_layernorm.weight",
                f"{attention}.q_layernorm.weight",
                ("self_attn.q_norm.weight",),
            ),
            LayerTensor(
                f"{attention}.k_layernorm.weight",
                f"{attention}.k_layernorm.weight",
                ("self_attn.k_norm.weight",),
            ),
        ]
    return tensors


def hf_layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


HF_EMBEDDING = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_OUTPUT = "lm_head.weight"


def hf_shapes(model: ModelConfig, vocab_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Expected shape of every Hugging Face tensor name pattern (layer-relative names for the
    layers), with the config.json fields that imply it (for shape-mismatch errors)."""
    hidden, heads, groups = model.hidden_size, model.num_attention_heads, model.query_groups()
    head, ffn = model.head_dim(), model.ffn_size()
    attention = "num_attention_heads, num_key_value_heads, head_dim, hidden_size"
    return {
        HF_EMBEDDING: ((vocab_size, hidden), "vocab_size, hidden_size"),
        HF_OUTPUT: ((vocab_size, hidden), "vocab_size, hidden_size"),
        HF_FINAL_NORM: ((hidden,), "hidden_size"),
        "input_layernorm.weight": ((hidden,), "hidden_size"),
        "post_attention_layernorm.weight": ((hidden,), "hidden_size"),
        "self_attn.q_proj.weight": ((heads * head, hidden), attention),
        "self_attn.k_proj.weight": ((groups * head, hidden), attention),
        "self_attn.v_proj.weight": ((groups * head, hidden), attention),
        "self_attn.q_proj.bias": ((heads * head,), attention),
        "self_attn.k_proj.bias": ((groups * head,), attention),
        "self_attn.v_proj.bias": ((groups * head,), attention),
        "self_attn.o_proj.weight": ((hidden, heads * head), attention),
        "self_attn.q_norm.weight": ((head,), "head_dim"),
        "self_attn.k_norm.weight": ((head,), "head_dim"),
        "mlp.gate_proj.weight": ((ffn, hidden), "intermediate_size, hidden_size"),
        "mlp.up_proj.weight": ((ffn, hidden), "intermediate_size, hidden_size"),
        "mlp.down_proj.weight": ((hidden, ffn), "intermediate_size, hidden_size"),
    }


# ---- layouts ------------------------------------------------------------------------------------


def fuse(entry: LayerTensor, parts: list[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    """The global Megatron tensor of ``entry`` from its Hugging Face tensors (in ``entry.hf``
    order)."""
    if entry.kind == "copy":
        return parts[0]
    if entry.kind == "gated":
        return torch.cat(parts, dim=0)
    q, k, v = parts
    groups = model.query_groups()
    per_group = model.num_attention_heads // groups
    rest = q.shape[1:]
    q = q.reshape(groups, per_group * model.head_dim(), *rest)
    k = k.reshape(groups, model.head_dim(), *rest)
    v = v.reshape(groups, model.head_dim(), *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split(entry: LayerTensor, tensor: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    """The Hugging Face tensors of ``entry`` from its global Megatron tensor (inverse of
    :func:`fuse`)."""
    if entry.kind == "copy":
        return [tensor]
    if entry.kind == "gated":
        return list(tensor.chunk(2, dim=0))
    groups, head = model.query_groups(), model.head_dim()
    per_group = model.num_attention_heads // groups
    rest = tensor.shape[1:]
    grouped = tensor.reshape(groups, (per_group + 2) * head, *rest)
    q, k, v = grouped.split([per_group * head, head, head], dim=1)
    return [part.reshape(-1, *rest) for part in (q, k, v)]


def tensor_parallel_slice(
    full: torch.Tensor, local_shape: torch.Size, tp_rank: int, tp_size: int, gated: bool
) -> torch.Tensor:
    """This tensor-parallel rank's part of a global tensor, for a parameter of ``local_shape``:
    the one dimension that is ``tp_size`` times smaller is split (a gated ``linear_fc1`` holds
    its slice of the gate over its slice of the up projection); replicated tensors are whole."""
    if tuple(full.shape) == tuple(local_shape):
        return full
    split = [d for d, (g, n) in enumerate(zip(full.shape, local_shape)) if g != n]
    if len(split) != 1 or full.shape[split[0]] != local_shape[split[0]] * tp_size:
        raise ValueError(f"cannot split {list(full.shape)} into {tp_size} x {list(local_shape)}")
    dim = split[0]
    if gated:
        return torch.cat([half.chunk(tp_size, dim)[tp_rank] for half in full.chunk(2, 0)], 0)
    return full.chunk(tp_size, dim)[tp_rank]


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """A vocabulary tensor padded with zero rows to the model's padded vocabulary."""
    if tensor.shape[0] == rows:
        return tensor
    padding = tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, padding], dim=0)


# ---- Hugging Face safetensors files --------------------------------------------------------------


class HFWeights:
    """The tensors of a Hugging Face model directory (``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``), read one tensor at a time from memory-mapped files:
    nothing is read that is not asked for. Every shard the index names must exist; a tensor that
    is missing or whose shape differs from what config.json implies is a ConfigError naming the
    file and the tensor."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            self.source = str(index)
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ConfigError(str(index), f"not a safetensors index ({error!r})") from error
            self.files = {name: self.directory / file for name, file in weight_map.items()}
            for file in sorted(set(self.files.values())):
                if not file.is_file():
                    raise ConfigError(
                        str(index),
                        f"weight_map names {file.name}, which is missing from {self.directory}",
                    )
        elif single.is_file():
            from safetensors import safe_open

            self.source = str(single)
            with safe_open(str(single), framework="pt") as handle:
                self.files = {name: single for name in handle.keys()}
        else:
            bins = sorted(p.name for p in self.directory.glob("*.bin"))
            hint = (
                f" (found {', '.join(bins[:3])}: re-save with safe_serialization=True)"
                if bins
                else ""
            )
            raise ConfigError(str(self.directory), f"has no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _file(self, name: str) -> Path:
        file = self.files.get(name)
        if file is None:
            raise ConfigError(self.source, f"has no tensor {name}, which the model needs")
        return file

    def _check_shape(self, file: Path, name: str, found, shape, fields: str) -> None:
        if tuple(found) != tuple(shape):
            raise ConfigError(
                str(file),
                f"tensor {name} has shape {list(found)}, but config.json ({fields}) implies "
                f"{list(shape)}",
            )

    def check(self, model: ModelConfig, vocab_size: int) -> None:
        """Every tensor ``model`` needs exists with the shape config.json implies (read from
        the safetensors headers alone)."""
        from safetensors import safe_open

        shapes = hf_shapes(model, vocab_size)
        for name, relative in required_hf_tensors(model):
            file = self._file(name)
            with safe_open(str(file), framework="pt") as handle:
                found = handle.get_slice(name).get_shape()
            self._check_shape(file, name, found, *shapes[relative])

    def get(self, name: str, shape: tuple[int, ...], fields: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._file(name)
        with safe_open(str(file), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        self._check_shape(file, name, tensor.shape, shape, fields)
        return tensor


def required_hf_tensors(model: ModelConfig) -> list[tuple[str, str]]:
    """(name, name pattern of :func:`hf_shapes`) of every Hugging Face tensor ``model`` is made
    of."""
    names = [(HF_EMBEDDING, HF_EMBEDDING), (HF_FINAL_NORM, HF_FINAL_NORM)]
    if model.untie_embeddings_and_output_weights:
        names.append((HF_OUTPUT, HF_OUTPUT))
    for layer in range(model.num_layers):
        for entry in layer_tensors(model):
            names += [(hf_layer_prefix(layer) + name, name) for name in entry.hf]
    return names


class ShardedSafetensorsWriter:
    """Writes tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most
    ``max_shard_bytes`` each plus ``model.safetensors.index.json`` (one ``model.safetensors``
    when everything fits in one shard), as ``transformers``' ``save_pretrained`` does. Holds at
    most one shard in memory."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(
            self.pending,
            str(self.directory / f"shard-{len(self.shards):05d}.tmp"),
            metadata={"format": "pt"},
        )
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Names the shards and writes the index; returns the files written."""
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            os.replace(self.directory / "shard-00000.tmp", self.directory / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, files = {}, []
        for number, names in enumerate(self.shards):
            file = f"model-{number + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / f"shard-{number:05d}.tmp", self.directory / file)
            files.append(file)
            weight_map.update({name: file for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        return [*files, INDEX_FILE]


# ---- tokenizer files ---------------------------------------------------------------------------

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
)


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """Copies the tokenizer (and generation) files of a Hugging Face directory that exist."""
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied
