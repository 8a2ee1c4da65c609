"""Converts Hugging Face models to megatron-sip checkpoints and back.

    # Hugging Face directory -> torch_dist checkpoint at TP=2, PP=1 (+ model.args beside it)
    python tools/convert_checkpoint.py import --hf-model ~/models/Llama-3.2-1B \\
        --output checkpoints/llama32-1b --tensor-model-parallel-size 2
    # checkpoint (any TP/PP, policy or EMA reference) -> Hugging Face directory
    python tools/convert_checkpoint.py export --load checkpoints/sip-run \\
        --output exported/sip-run

Supported architectures: LlamaForCausalLM (Llama 2, 3, 3.1/3.2 RoPE scaling), MistralForCausalLM
(no sliding window), Qwen2ForCausalLM, Qwen3ForCausalLM. Files are read from local disk only.

Import runs on TP x PP local CPU processes it starts itself (gloo); under torchrun it uses the
launched world instead (a multiple of TP x PP). Each rank holds its shard of the model plus one
layer of Hugging Face tensors. Export runs on one process and holds one layer plus one output
shard. See docs/huggingface.md.
"""

# ruff: noqa: E402
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import torch.distributed as dist

from megatron_sip.arguments import add_config_arguments, config_from_namespace, validate_layout
from megatron_sip.errors import ConfigError, exits_on_bad_input, require_positive
from megatron_sip.initialize import (
    ParallelConfig,
    destroy_distributed,
    initialize_distributed,
    spawn_local_world,
)
from megatron_sip.log import setup_logging

MIB = 1024**2


@dataclasses.dataclass
class ImportConfig:
    """Hugging Face model directory -> torch_dist checkpoint."""

    hf_model: Optional[str] = None
    """The Hugging Face model directory: config.json, model.safetensors (or shards with
    model.safetensors.index.json), tokenizer.json and tokenizer_config.json."""

    output: Optional[str] = None
    """The checkpoint directory to create (must not exist or be empty); model.args and the
    tokenizer are written into it too."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size the checkpoint is saved at (any TP/PP loads it)."""

    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size the checkpoint is saved at."""

    seq_length: Optional[int] = None
    """--seq-length recorded for the model (default: its max_position_embeddings, at most
    4096)."""

    def __post_init__(self):
        for flag, value in (("--hf-model", self.hf_model), ("--output", self.output)):
            if not value:
                raise ConfigError(flag, "required")
        if not Path(self.hf_model).is_dir():
            raise ConfigError("--hf-model", f"{self.hf_model} is not a directory")
        require_positive("--tensor-model-parallel-size", self.tensor_model_parallel_size)
        require_positive("--pipeline-model-parallel-size", self.pipeline_model_parallel_size)
        if self.seq_length is not None:
            require_positive("--seq-length", self.seq_length)

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
        )


@dataclasses.dataclass
class ExportConfig:
    """torch_dist checkpoint -> Hugging Face model directory."""

    load: Optional[str] = None
    """The checkpoint directory (its tracker file names the iteration)."""

    output: Optional[str] = None
    """The Hugging Face directory to create (must not exist or be empty)."""

    ckpt_step: Optional[int] = None
    """Export this iteration instead of the tracker's."""

    export_weights: Literal["model", "reference"] = "model"
    """model: the trained policy; reference: a SIP run's EMA reference."""

    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    """Tensor dtype of the safetensors (default: the imported model's, else float32)."""

    max_shard_size_mb: float = 2048
    """Largest safetensors shard, in MiB."""

    def __post_init__(self):
        for flag, value in (("--load", self.load), ("--output", self.output)):
            if not value:
                raise ConfigError(flag, "required")
        require_positive("--max-shard-size-mb", self.max_shard_size_mb)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, cls in (("import", ImportConfig), ("export", ExportConfig)):
        sub = commands.add_parser(name, help=cls.__doc__, allow_abbrev=False)
        add_config_arguments(sub, cls, name)
    return parser


def _check_import(config: ImportConfig, world_size: int) -> None:
    """What can be checked before any rank starts: config.json, the tokenizer, every tensor's
    presence and shape (from the safetensors headers), the parallel layout."""
    from megatron_sip.models.hf import weights as W
    from megatron_sip.models.hf.convert import hf_model_settings

    hf_dir = Path(config.hf_model)
    model, tokenizer, _ = hf_model_settings(hf_dir, hf_dir, config.seq_length)
    W.HFWeights(hf_dir).check(model, tokenizer.model_vocab_size)
    validate_layout(config.parallel(), model, None, world_size)


def _import_rank(config: ImportConfig) -> None:
    from megatron_sip.models.hf.convert import import_checkpoint

    setup_logging()
    parallel = config.parallel()
    try:
        context = initialize_distributed(parallel, "cpu")
        result = import_checkpoint(
            config.hf_model, config.output, parallel, context, seq_length=config.seq_length
        )
        stats = [None] * context.world_size
        dist.all_gather_object(
            stats,
            (result.peak_rss_bytes - result.baseline_rss_bytes, result.shard_bytes),
        )
        if context.rank == 0:
            parts = ", ".join(
                f"rank {r}: +{grown / MIB:.0f} MiB (shard {shard / MIB:.0f} MiB)"
                for r, (grown, shard) in enumerate(stats)
            )
            tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
            print(
                f"imported {config.hf_model} -> {result.output} at TP={tp} PP={pp} in "
                f"{result.seconds:.1f} s; "
                f"largest layer {result.layer_bytes / MIB:.1f} MiB; peak memory growth {parts}; "
                f"flags: @{result.output / 'model.args'}",
                flush=True,
            )
    except ConfigError as error:
        print(f"convert_checkpoint.py: error: {error}", file=sys.stderr, flush=True)
        os._exit(2)
    finally:
        destroy_distributed()


def run_import(config: ImportConfig) -> None:
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world:  # launched by torchrun
        _check_import(config, world)
        _import_rank(config)
        return
    world = config.tensor_model_parallel_size * config.pipeline_model_parallel_size
    _check_import(config, world)
    import torch.multiprocessing as mp

    try:
        spawn_local_world(_import_rank, world, config)
    except mp.ProcessExitedException as error:
        sys.exit(error.exit_code or 1)


def run_export(config: ExportConfig) -> None:
    from megatron_sip.models.hf.convert import export_checkpoint

    setup_logging()
    result = export_checkpoint(
        config.load,
        config.output,
        iteration=config.ckpt_step,
        weights=config.export_weights,
        dtype=config.dtype,
        max_shard_bytes=int(config.max_shard_size_mb * MIB),
    )
    print(
        f"exported {config.load} ({config.export_weights}) -> {result.output} in "
        f"{result.seconds:.1f} s: {', '.join(result.files)}; peak memory "
        f"{result.peak_rss_bytes / MIB:.0f} MiB",
        flush=True,
    )


@exits_on_bad_input
def main(argv=None) -> None:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    try:
        cls = ImportConfig if namespace.command == "import" else ExportConfig
        config = config_from_namespace(cls, namespace)
    except ConfigError as error:
        parser.error(str(error))
    if namespace.command == "import":
        run_import(config)
    else:
        run_export(config)


if __name__ == "__main__":
    main()
