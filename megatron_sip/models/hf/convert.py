"""Hugging Face directory <-> torch_dist checkpoint.

Import is collective over the initialised world: each rank builds only its tensor/pipeline
shard of Megatron-Core's GPTModel, fills it layer by layer from the Hugging Face safetensors
(each tensor read from its memory-mapped shard when its layer is converted, so a rank holds its
shard of the model plus one layer's Hugging Face tensors), and the ranks save one torch_dist
checkpoint together (Megatron-Core's writer copies the SwiGLU gate/up halves it saves). Export
reads the checkpoint one layer at a time (:class:`CheckpointReader`, any saved TP/PP, no
collectives) and writes safetensors shards one at a time, so it holds one layer and one output
shard.

Both write into ``<output>.partial`` and rename it to ``<output>`` when complete: an interrupted
conversion never leaves a directory that looks finished, and never replaces an existing one.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sip.arguments import flags_file_lines, validate_layout
from megatron_sip.data.config import TokenizerConfig, embedding_vocab_size
from megatron_sip.data.tokenizers import HuggingFaceTokenizer
from megatron_sip.errors import ConfigError
from megatron_sip.initialize import DistributedContext, ParallelConfig
from megatron_sip.models.checkpointing import (
    CheckpointReader,
    checkpoint_dir,
    checkpoint_extra,
    is_complete,
    megatron_lm_args,
    model_metadata,
    read_tracker,
    save_checkpoint,
)
from megatron_sip.models.config import ModelConfig
from megatron_sip.models.gpt import build_gpt_model, transformer_config
from megatron_sip.models.hf import weights as W
from megatron_sip.models.hf.config import hf_config_from_model, model_flags_from_hf, read_json

FLAGS_FILE = "model.args"  # the model and tokenizer flags
TOKENIZER_FLAGS_FILE = "tokenizer.args"  # the tokenizer flags alone (tools/preprocess_data.py)
TOKENIZER_DIR = "tokenizer"
HF_CONFIG_KEY = "hf_config"  # the imported config.json, kept in the checkpoint for the export
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _claim_output(output: Path) -> Path:
    """The staging directory for ``output``; an existing non-empty ``output`` is refused."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(
            "--output", f"{output} exists and is not empty; pick a new directory (never replaced)"
        )
    return _partial_dir(output)


def _publish(partial: Path, output: Path) -> None:
    if output.exists():
        output.rmdir()  # empty (checked by _claim_output)
    os.rename(partial, output)


# ---- import -----------------------------------------------------------------------------------


@dataclasses.dataclass
class ImportResult:
    output: Path
    model: ModelConfig
    tokenizer: TokenizerConfig
    seconds: float
    shard_bytes: int  # this rank's parameters
    layer_bytes: int  # the largest layer's tensors, as converted
    peak_rss_bytes: int  # this rank's peak resident memory during the import
    baseline_rss_bytes: int  # ... before the model was built


def hf_model_settings(
    hf_dir: Path, tokenizer_dir: Path, seq_length: Optional[int] = None
) -> tuple[ModelConfig, TokenizerConfig, dict]:
    """(model flags, tokenizer flags, config.json) of a Hugging Face model directory. The
    tokenizer reads ``tokenizer_dir`` and adds BOS to every text when the model's tokenizer does
    (its post-processor: Llama's BOS, none for Qwen), as Megatron-LM's
    ``--tokenizer-hf-include-special-tokens`` does."""
    config_path = hf_dir / "config.json"
    hf_config = read_json(config_path)
    model = ModelConfig(**model_flags_from_hf(hf_config, str(config_path), seq_length=seq_length))
    vocab_size = hf_config.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ConfigError(
            str(config_path), f"vocab_size: must be a positive integer, got {vocab_size!r}"
        )
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ConfigError(
            str(hf_dir),
            "has no tokenizer.json (the fast tokenizer file); save the tokenizer with "
            "transformers (AutoTokenizer ... save_pretrained) into it",
        )
    plain = HuggingFaceTokenizer(str(tokenizer_dir))
    tokenizer = TokenizerConfig(
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=str(tokenizer_dir),
        tokenizer_hf_include_special_tokens=plain.adds_special_tokens,
        model_vocab_size=vocab_size,
    )
    if plain.vocab_size > vocab_size:
        raise ConfigError(
            str(config_path),
            f"vocab_size: {vocab_size} is smaller than the tokenizer's {plain.vocab_size} ids "
            f"({tokenizer_dir / 'tokenizer.json'})",
        )
    return model, tokenizer, hf_config


@dataclasses.dataclass
class _ConvertedModel:
    """What :func:`megatron_lm_args` reads of a job, for a converted model (no training run)."""

    parallel: ParallelConfig
    model: ModelConfig
    tokenizer: TokenizerConfig


def _fill_from_hf(
    module: torch.nn.Module,
    model: ModelConfig,
    weights: W.HFWeights,
    vocab_size: int,
    context: DistributedContext,
) -> int:
    """Copies this rank's shard of every tensor from the Hugging Face files, layer by layer;
    returns the largest layer's bytes (as converted, fp32)."""
    shapes = W.hf_shapes(model, vocab_size)
    params = dict(module.named_parameters())
    tp_rank, tp_size = context.tensor_parallel_rank, context.pg_collection.tp.size()
    filled: set[str] = set()

    def fill(name: str, full: torch.Tensor, gated: bool = False) -> None:
        param = params[name]
        with torch.no_grad():
            param.copy_(W.tensor_parallel_slice(full, param.shape, tp_rank, tp_size, gated))
        filled.add(name)

    def hf(name: str, relative: Optional[str] = None) -> torch.Tensor:
        shape, fields = shapes[relative or name]
        return weights.get(name, shape, fields).float()

    padded_rows = params.get("embedding.word_embeddings.weight", params.get("output_layer.weight"))
    largest = 0
    if "embedding.word_embeddings.weight" in params:
        fill(
            "embedding.word_embeddings.weight",
            _pad_global(hf(W.HF_EMBEDDING), padded_rows, tp_size),
        )
    entries = W.layer_tensors(model)
    for local, layer in enumerate(module.decoder.layers):
        index = layer.layer_number - 1  # global, 0-based
        prefix = W.hf_layer_prefix(index)
        layer_bytes = 0
        for entry in entries:
            parts = [hf(prefix + name, name) for name in entry.hf]
            layer_bytes += sum(p.numel() * p.element_size() for p in parts)
            full = W.fuse(entry, parts, model)
            name = f"decoder.layers.{local}.{entry.megatron}"
            if name not in params:  # Transformer Engine's fused layer-norm names
                name = f"decoder.layers.{local}.{entry.checkpoint}"
            fill(name, full, gated=entry.kind == "gated")
            del parts, full
        largest = max(largest, layer_bytes)
    if "decoder.final_layernorm.weight" in params:
        fill("decoder.final_layernorm.weight", hf(W.HF_FINAL_NORM))
    if "output_layer.weight" in params:
        # Tied embeddings: the last pipeline stage's output layer starts as the embedding.
        source = W.HF_OUTPUT if model.untie_embeddings_and_output_weights else W.HF_EMBEDDING
        fill("output_layer.weight", _pad_global(hf(source), padded_rows, tp_size))
    missing = sorted(set(params) - filled)
    if missing:
        raise RuntimeError(f"parameters not converted: {', '.join(missing)}")
    return largest


def _pad_global(tensor: torch.Tensor, local_param: torch.Tensor, tp_size: int) -> torch.Tensor:
    """A vocabulary tensor padded to the model's padded vocabulary (all TP ranks' rows)."""
    return W.pad_rows(tensor, local_param.shape[0] * tp_size)


def import_checkpoint(
    hf_dir: str | os.PathLike,
    output: str | os.PathLike,
    parallel: ParallelConfig,
    context: DistributedContext,
    *,
    seq_length: Optional[int] = None,
) -> ImportResult:
    """Converts a Hugging Face model directory into a torch_dist checkpoint (iteration 0, no
    optimizer or RNG state) under ``output``, saved at ``parallel``'s TP/PP, with the model and
    tokenizer settings inside it (``--use-checkpoint-args``, roles) and beside it
    (``model.args``; ``tokenizer.args`` for preprocessing), and the tokenizer files in
    ``output/tokenizer``. Collective."""
    start = time.perf_counter()
    hf_dir, output = Path(hf_dir), Path(output).absolute()
    partial = _claim_output(output)
    _barrier()
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        W.copy_tokenizer_files(hf_dir, partial / TOKENIZER_DIR)
    _barrier()
    model, tokenizer, hf_config = hf_model_settings(hf_dir, partial / TOKENIZER_DIR, seq_length)
    validate_layout(parallel, model, None, context.world_size)
    weights = W.HFWeights(hf_dir)
    baseline = peak_rss_bytes()
    tokenizer_vocab = HuggingFaceTokenizer(tokenizer.tokenizer_model).vocab_size
    vocab_rows = embedding_vocab_size(
        tokenizer, tokenizer_vocab, parallel.tensor_model_parallel_size
    )
    config = transformer_config(model, parallel)
    config.perform_initialization = False  # every weight is overwritten: no init temporaries
    module = build_gpt_model(model, config, vocab_rows, context.pg_collection)
    largest_layer = _fill_from_hf(module, model, weights, tokenizer.model_vocab_size, context)
    # Saved with the paths it will have once published.
    tokenizer = dataclasses.replace(tokenizer, tokenizer_model=str(output / TOKENIZER_DIR))
    converted = _ConvertedModel(parallel, model, tokenizer)
    args = megatron_lm_args(converted, padded_vocab_size=vocab_rows, world_size=context.world_size)
    save_checkpoint(
        partial,
        0,
        [module],
        args=args,
        save_optim=False,
        save_rng=False,
        extra_common={**model_metadata(model, tokenizer), HF_CONFIG_KEY: hf_config},
    )
    if _rank() == 0:
        header = f"# {output}: imported from {hf_dir.absolute()}"
        tokenizer_lines = flags_file_lines(tokenizer)
        model_lines = flags_file_lines(model) + tokenizer_lines
        (partial / FLAGS_FILE).write_text("\n".join([header, *model_lines]) + "\n")
        (partial / TOKENIZER_FLAGS_FILE).write_text("\n".join([header, *tokenizer_lines]) + "\n")
        _publish(partial, output)
    _barrier()
    shard_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return ImportResult(
        output=output,
        model=model,
        tokenizer=tokenizer,
        seconds=time.perf_counter() - start,
        shard_bytes=shard_bytes,
        layer_bytes=largest_layer,
        peak_rss_bytes=peak_rss_bytes(),
        baseline_rss_bytes=baseline,
    )


# ---- export -----------------------------------------------------------------------------------


@dataclasses.dataclass
class ExportResult:
    output: Path
    files: list[str]
    seconds: float
    peak_rss_bytes: int


def _checkpoint_path(load: Path, iteration: Optional[int]) -> tuple[Path, int]:
    if iteration is None:
        iteration = read_tracker(load)
        if iteration is None:
            raise ConfigError("--load", f"no checkpoint in {load} (no tracker file)")
    path = checkpoint_dir(load, iteration)
    if not is_complete(path):
        raise ConfigError("--load", f"{path} is not a complete checkpoint")
    return path, iteration


def _export_tokenizer(tokenizer: TokenizerConfig, target: Path) -> dict:
    """Copies the tokenizer files; returns the token ids for config.json."""
    if tokenizer.tokenizer_type != "HuggingFaceTokenizer":
        raise ConfigError(
            "--tokenizer-type",
            f"the checkpoint's tokenizer is {tokenizer.tokenizer_type}; the export writes "
            "HuggingFaceTokenizer (tokenizer.json) models only",
        )
    source = Path(tokenizer.tokenizer_model)
    source = source if source.is_dir() else source.parent
    if not (source / "tokenizer.json").is_file():
        raise ConfigError("--tokenizer-model", f"{source} has no tokenizer.json to export")
    W.copy_tokenizer_files(source, target)
    loaded = HuggingFaceTokenizer(str(source))
    ids = {"eos_token_id": loaded.eod}
    if loaded.bos >= 0:
        ids["bos_token_id"] = loaded.bos
    if loaded.pad >= 0:
        ids["pad_token_id"] = loaded.pad
    return ids


def export_checkpoint(
    load: str | os.PathLike,
    output: str | os.PathLike,
    *,
    iteration: Optional[int] = None,
    weights: str = "model",
    dtype: Optional[str] = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> ExportResult:
    """Writes the checkpoint under ``load`` (its tracker's iteration, or ``iteration``) as a
    Hugging Face model directory: ``config.json``, ``generation_config.json``, safetensors
    shards with their index, and the tokenizer. ``weights`` is ``model`` (the policy) or
    ``reference`` (a SIP run's EMA reference). ``dtype`` defaults to the imported model's
    (float32 for models trained here). Runs on one process, without torch.distributed."""
    start = time.perf_counter()
    load, output = Path(load), Path(output).absolute()
    path, iteration = _checkpoint_path(load, iteration)
    extra = checkpoint_extra(load, iteration) or {}
    if "model" not in extra or "tokenizer" not in extra:
        raise ConfigError("--load", f"{path} stores no model and tokenizer settings to export")
    model, tokenizer = ModelConfig(**extra["model"]), TokenizerConfig(**extra["tokenizer"])
    saved_hf = extra.get(HF_CONFIG_KEY)
    if weights not in ("model", "reference"):
        raise ConfigError(
            "--export-weights", f"unknown value {weights!r}; choose model or reference"
        )
    prefix = "" if weights == "model" else "reference."
    reader = CheckpointReader(path)
    if f"{prefix}embedding.word_embeddings.weight" not in reader:
        raise ConfigError(
            "--export-weights",
            f"{path} holds no {weights} weights"
            + (" (an EMA reference is saved by SIP runs with one)" if prefix else ""),
        )
    partial = _claim_output(output)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    token_ids = _export_tokenizer(tokenizer, partial)
    tokenizer_vocab = HuggingFaceTokenizer(tokenizer.tokenizer_model).vocab_size
    vocab_size = tokenizer.model_vocab_size or tokenizer_vocab
    if dtype is None:
        dtype = str(
            (saved_hf or {}).get("dtype") or (saved_hf or {}).get("torch_dtype") or "float32"
        )
    if dtype not in DTYPES:
        raise ConfigError("--dtype", f"unknown value {dtype!r}; choose one of {', '.join(DTYPES)}")
    config = hf_config_from_model(
        model, vocab_size, dtype=dtype, saved=saved_hf, token_ids=token_ids
    )
    torch_dtype = DTYPES[dtype]
    writer = W.ShardedSafetensorsWriter(partial, max_shard_bytes)

    def load_keys(names: list[str], layer: Optional[int] = None) -> dict:
        return reader.read([prefix + n for n in names], layer)

    def put(name: str, tensor: torch.Tensor) -> None:
        writer.add(name, tensor.to(torch_dtype).clone())

    embedding = load_keys(["embedding.word_embeddings.weight"])
    put(W.HF_EMBEDDING, embedding[prefix + "embedding.word_embeddings.weight"][:vocab_size])
    del embedding
    entries = W.layer_tensors(model)
    for layer in range(model.num_layers):
        loaded = load_keys([f"decoder.layers.{e.checkpoint}" for e in entries], layer)
        for entry in entries:
            tensor = loaded[f"{prefix}decoder.layers.{entry.checkpoint}"]
            for name, part in zip(entry.hf, W.split(entry, tensor, model)):
                put(W.hf_layer_prefix(layer) + name, part)
        del loaded
    final = load_keys(["decoder.final_layernorm.weight"])
    put(W.HF_FINAL_NORM, final[prefix + "decoder.final_layernorm.weight"])
    if model.untie_embeddings_and_output_weights:
        output_layer = load_keys(["output_layer.weight"])
        put(W.HF_OUTPUT, output_layer[prefix + "output_layer.weight"][:vocab_size])
    files = writer.finish()
    config.save_pretrained(str(partial))
    _write_generation_config(config, partial)
    _publish(partial, output)
    return ExportResult(
        output=output,
        files=["config.json", *files],
        seconds=time.perf_counter() - start,
        peak_rss_bytes=peak_rss_bytes(),
    )


def _write_generation_config(config, directory: Path) -> None:
    """generation_config.json from the config's token ids, unless the tokenizer copy brought the
    model's own."""
    if (directory / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(config).save_pretrained(str(directory))


def hf_state_dict(model: ModelConfig, module, vocab_size: int) -> tuple[object, dict]:
    """(transformers config, Hugging Face tensors) of an unsplit (TP = PP = 1) model in memory,
    fp32 and unpadded to ``vocab_size``: what :func:`export_checkpoint` writes, for benchmarks
    and tests that run both implementations side by side."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    config = hf_config_from_model(model, vocab_size, dtype="float32")
    tensors = {W.HF_EMBEDDING: params["embedding.word_embeddings.weight"][:vocab_size]}
    for layer in range(model.num_layers):
        for entry in W.layer_tensors(model):
            # The local spec's names, or Transformer Engine's (norms fused into the linears).
            name = f"decoder.layers.{layer}.{entry.megatron}"
            tensor = params.get(name, params.get(f"decoder.layers.{layer}.{entry.checkpoint}"))
            for name, part in zip(entry.hf, W.split(entry, tensor, model)):
                tensors[W.hf_layer_prefix(layer) + name] = part
    tensors[W.HF_FINAL_NORM] = params["decoder.final_layernorm.weight"]
    if model.untie_embeddings_and_output_weights:
        tensors[W.HF_OUTPUT] = params["output_layer.weight"][:vocab_size]
    return config, {name: t.float().contiguous().clone() for name, t in tensors.items()}
