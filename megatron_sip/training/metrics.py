"""Where training metrics go: the console (rank 0), TensorBoard and Weights & Biases, under
Megatron-LM's tag names so dashboards of both overlay.

Tag scheme (docs/training.md, "Logging and TensorBoard"):

- flat names are Megatron-LM's own, with its meaning: ``lm loss``, ``learning-rate``,
  ``batch-size``, ``loss-scale``, ``grad-norm``, ``params-norm``, ``world-size``, and each with a
  ``<tag> vs samples`` twin whose step is the consumed-sample count; ``iteration-time`` and
  ``throughput``; ``mem-*``; ``<loss> validation`` (``... ppl``);
- ``train/*``: what this loop adds that Megatron-LM does not log (skipped-update counters,
  tokens per second);
- ``sip/*``: the SIP step's own metrics.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Literal, Optional

import torch

from megatron_sip.errors import ConfigError
from megatron_sip.log import rank
from megatron_sip.platform import active_device

logger = logging.getLogger(__name__)

SAMPLES_SUFFIX = " vs samples"


@dataclasses.dataclass
class LoggingConfig:
    """Metric sinks, what they receive, profiling and memory housekeeping (Megatron-LM's
    logging, profiling and garbage-collection flags)."""

    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars to this directory (and --use-pytorch-profiler traces)."""

    tensorboard_log_interval: int = 1
    """Write the per-step TensorBoard / W&B scalars every this many steps."""

    tensorboard_queue_size: int = 1000
    """TensorBoard events queued before a write forces a flush to disk."""

    log_timers_to_tensorboard: bool = False
    """Write `iteration-time` (and, with --log-throughput, `throughput`) to TensorBoard at every
    --log-interval step."""

    log_loss_scale_to_tensorboard: bool = True
    """Write `loss-scale` (1 unless --fp16) to TensorBoard."""

    log_validation_ppl_to_tensorboard: bool = False
    """Also write validation perplexity (`<loss> validation ppl`)."""

    log_memory_to_tensorboard: bool = False
    """Write memory use every TensorBoard step: on GPU the CUDA allocator's statistics
    (`mem-reserved-bytes`, `mem-allocated-bytes`, `mem-max-allocated-bytes`,
    `mem-allocated-count`, as Megatron-LM); on CPU this process's resident set
    (`mem-rss-bytes`, `mem-max-rss-bytes`), which is what CPU training uses."""

    log_world_size_to_tensorboard: bool = False
    """Write `world-size` to TensorBoard."""

    log_params_norm: bool = False
    """Compute the L2 norm of all parameters after each step (over every model-parallel rank, as
    Megatron-LM's calc_params_l2_norm): console and `params-norm`."""

    log_throughput: bool = False
    """Console: model TFLOP/s per GPU (per rank on CPU), Megatron-LM's FLOP count over the
    measured step time; also `throughput` with --log-timers-to-tensorboard."""

    wandb_project: Optional[str] = None
    """Log to this Weights & Biases project (needs the wandb package)."""

    wandb_exp_name: Optional[str] = None
    """Weights & Biases run name."""

    wandb_save_dir: Optional[str] = None
    """Local directory for the Weights & Biases run files (wandb.init's dir). Default: wandb's
    own (./wandb)."""

    wandb_entity: Optional[str] = None
    """Weights & Biases entity (team) of the project."""

    manual_gc: bool = False
    """Disable Python's threshold-based garbage collector during training and collect manually
    (at the start, every --manual-gc-interval steps and around evaluations), so that collections
    happen at the same step on every rank."""

    manual_gc_interval: int = 0
    """With --manual-gc: collect every this many steps (0: only at start and around evaluation)."""

    manual_gc_eval: bool = True
    """With --manual-gc: collect before and after each evaluation."""

    empty_unused_memory_level: Literal[0, 1, 2] = 0
    """Release the CUDA caching allocator's unused blocks (torch.cuda.empty_cache) to reduce
    fragmentation, after every training step and every evaluation at levels 1 and 2 (Megatron-LM
    releases between backward and the optimizer step at 1, after that step too at 2; this loop
    does not reach inside the step). GPU only: the CPU allocator keeps no cache to release."""

    profile: bool = False
    """Profile steps --profile-step-start to --profile-step-end: with nsys (CUDA profiler API and
    NVTX ranges; run under `nsys profile --capture-range=cudaProfilerApi`), or with the PyTorch
    profiler given --use-pytorch-profiler."""

    profile_step_start: int = 10
    """Step at which profiling starts."""

    profile_step_end: int = 12
    """Step at which profiling stops."""

    profile_ranks: list[int] = dataclasses.field(default_factory=lambda: [0])
    """Global ranks to profile."""

    use_pytorch_profiler: bool = False
    """With --profile: use torch.profiler (works on CPU) and write its trace to
    --tensorboard-dir (TensorBoard's profiler plugin reads it)."""

    def __post_init__(self):
        for flag, value in (
            ("--tensorboard-log-interval", self.tensorboard_log_interval),
            ("--tensorboard-queue-size", self.tensorboard_queue_size),
        ):
            if value <= 0:
                raise ConfigError(flag, f"must be a positive number, got {value}")
        if self.empty_unused_memory_level not in (0, 1, 2):
            raise ConfigError(
                "--empty-unused-memory-level",
                f"choose 0, 1 or 2, got {self.empty_unused_memory_level}",
            )
        if self.manual_gc_interval < 0:
            raise ConfigError(
                "--manual-gc-interval", f"must be >= 0, got {self.manual_gc_interval}"
            )
        if not self.manual_gc:
            if self.manual_gc_interval:
                raise ConfigError("--manual-gc-interval", "only applies with --manual-gc")
            if not self.manual_gc_eval:
                raise ConfigError("--no-manual-gc-eval", "only applies with --manual-gc")
        if self.profile:
            if not 0 <= self.profile_step_start < self.profile_step_end:
                raise ConfigError(
                    "--profile-step-end",
                    f"must be above --profile-step-start {self.profile_step_start} (>= 0), "
                    f"got {self.profile_step_end}",
                )
            if self.use_pytorch_profiler and not self.tensorboard_dir:
                raise ConfigError(
                    "--use-pytorch-profiler", "writes its trace to --tensorboard-dir; give one"
                )
        else:
            for flag, value, default in (
                ("--use-pytorch-profiler", self.use_pytorch_profiler, False),
                ("--profile-step-start", self.profile_step_start, 10),
                ("--profile-step-end", self.profile_step_end, 12),
                ("--profile-ranks", self.profile_ranks, [0]),
            ):
                if value != default:
                    raise ConfigError(flag, "only applies with --profile")
        if self.wandb_project is None:
            for flag, value in (
                ("--wandb-exp-name", self.wandb_exp_name),
                ("--wandb-save-dir", self.wandb_save_dir),
                ("--wandb-entity", self.wandb_entity),
            ):
                if value is not None:
                    raise ConfigError(flag, "only applies with --wandb-project")

    def check_device(self, device: str) -> None:
        """Flags that need a GPU, refused on CPU (``device`` is the active one)."""
        if device == "cuda":
            return
        if self.empty_unused_memory_level:
            raise ConfigError(
                "--empty-unused-memory-level",
                "releases the CUDA caching allocator's cached blocks; on CPU there is no "
                "allocator cache to release, so this flag would do nothing; drop it",
            )
        if self.profile and not self.use_pytorch_profiler:
            raise ConfigError(
                "--profile",
                "without --use-pytorch-profiler profiles with nsys through the CUDA profiler "
                "API, which needs a GPU; add --use-pytorch-profiler (works on CPU) or drop it",
            )


class MetricWriter:
    """Scalars to TensorBoard / W&B, written by global rank 0 only (every rank holds the same
    step metrics). Carries the :class:`LoggingConfig` the training loop logs by."""

    def __init__(self, config: LoggingConfig, run_config: Optional[dict] = None):
        self.config = config
        self.tensorboard = None
        self.wandb = None
        try:
            config.check_device(active_device())
        except RuntimeError:  # no device activated: a loop driven without a platform (tests)
            pass
        if config.wandb_project and importlib.util.find_spec("wandb") is None:
            # On every rank, so that all of them stop.
            raise ConfigError(
                "--wandb-project",
                "needs the wandb package, which is not installed: pip install wandb, or drop "
                "--wandb-project",
            )
        if rank() != 0:
            return
        if config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(
                log_dir=config.tensorboard_dir, max_queue=config.tensorboard_queue_size
            )
        if config.wandb_project:
            import wandb

            if config.wandb_save_dir:
                os.makedirs(config.wandb_save_dir, exist_ok=True)
            self.wandb = wandb.init(
                project=config.wandb_project,
                name=config.wandb_exp_name,
                dir=config.wandb_save_dir,
                entity=config.wandb_entity,
                config=run_config,
            )

    def scalars(self, values: dict[str, float], step: int) -> None:
        """``values`` at iteration ``step``, to TensorBoard and W&B."""
        self.tensorboard_scalars(values, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def sample_scalars(self, values: dict[str, float], iteration: int, consumed: int) -> None:
        """The ``<tag> vs samples`` twins of the flat (Megatron-LM) tags among ``values``, at
        ``consumed`` samples: TensorBoard only, as Megatron-LM (W&B steps must only increase;
        it gets ``samples vs steps`` instead)."""
        twins = {name + SAMPLES_SUFFIX: value for name, value in values.items() if "/" not in name}
        self.tensorboard_scalars(twins, consumed)
        if self.wandb is not None:
            self.wandb.log({"samples vs steps": consumed}, step=iteration)

    def tensorboard_scalars(self, values: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def memory_metrics() -> dict[str, float]:
    """Memory use of this process: the CUDA allocator's statistics under Megatron-LM's tags on
    GPU, the resident set size on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stats = torch.cuda.memory_stats()
        return {
            "mem-reserved-bytes": stats["reserved_bytes.all.current"],
            "mem-allocated-bytes": stats["allocated_bytes.all.current"],
            "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"],
            "mem-allocated-count": stats["allocation.all.current"],
        }
    # VmHWM is the peak of VmRSS (the kernel reports it as at least the current value).
    with open("/proc/self/status") as status:
        kib = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
    return {
        "mem-rss-bytes": float(kib["VmRSS"].split()[0]) * 1024,
        "mem-max-rss-bytes": float(kib["VmHWM"].split()[0]) * 1024,
    }


@torch.no_grad()
def params_l2_norm(model_chunks: Sequence[torch.nn.Module]) -> float:
    """L2 norm of all parameters of the model over every model-parallel rank, as Megatron-LM's
    ``calc_params_l2_norm``: each parameter counted once (no tensor-parallel duplicates, no
    second copy of tied embeddings), the fp32 main copy where the optimizer keeps one unsharded,
    squares summed over the model-parallel group (every data-parallel replica holds the same)."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    from megatron_sip.models.checkpointing import unwrap_model

    groups = unwrap_model(model_chunks[0]).pg_collection
    squares = None
    for chunk in model_chunks:
        for param in chunk.parameters():
            if not param_is_not_tensor_parallel_duplicate(param, tp_group=groups.tp):
                continue
            if not param_is_not_shared(param):
                continue
            main = getattr(param, "main_param", None)
            if main is None or getattr(param, "main_param_sharded", False):
                main = param.data
            term = torch.sum(main.float() ** 2)
            squares = term if squares is None else squares + term
    if squares is None:
        squares = torch.zeros((), dtype=torch.float32)
    squares = squares.reshape(1).to(torch.float32)
    if groups.mp.size() > 1:
        torch.distributed.all_reduce(squares, group=groups.mp)
    return squares.sqrt().item()


def flops_per_sample(config, seq_length: int, vocab_size: int) -> float:
    """Training FLOPs of one sample, as Megatron-LM's ``num_floating_point_operations`` counts
    them for a dense GPT (``config`` a Megatron-Core TransformerConfig; ``vocab_size`` padded):
    every GEMM three times (forward, weight and data gradients), 2 FLOPs per multiply-add;
    attention scores and values over half the sequence (causal mask); the output layer.
    Activation recomputation is not counted (model FLOPs)."""
    hidden = config.hidden_size
    query = config.kv_channels * config.num_attention_heads
    key_value = config.kv_channels * (config.num_query_groups or config.num_attention_heads)
    ffn_factor = 3 if config.gated_linear_unit else 2
    attention = (
        hidden * (query + 2 * key_value)  # QKV projection
        + query * seq_length  # QK^T and (QK^T)V, halved by the causal mask
        + query * hidden  # output projection
    )
    per_token = (
        config.num_layers * (hidden * config.ffn_hidden_size * ffn_factor + attention)
        + hidden * vocab_size
    )
    return 3 * 2 * seq_length * per_token


class StepLog:
    """Megatron-LM's ``training_log`` for one loop: what goes to TensorBoard / W&B each step
    (every --tensorboard-log-interval steps) and what the console line shows every
    --log-interval steps (times averaged over the steps since the last line)."""

    def __init__(
        self,
        writer: MetricWriter,
        *,
        flops_per_step: Optional[float] = None,
        model_chunks: Sequence[torch.nn.Module] = (),
        world_size: int = 1,
    ):
        config = writer.config
        if config.log_params_norm and not model_chunks:
            raise ConfigError("--log-params-norm", "this trainer does not expose its model")
        if config.log_throughput and not flops_per_step:
            raise ConfigError("--log-throughput", "this trainer has no FLOP count")
        self.writer, self.config = writer, config
        self.flops_per_step, self.model_chunks, self.world_size = (
            flops_per_step,
            model_chunks,
            world_size,
        )
        self.interval_seconds, self.interval_steps = 0.0, 0

    def step(
        self,
        iteration: int,
        consumed_samples: int,
        metrics: dict[str, float],
        seconds: float,
        console: bool,
    ) -> dict[str, float]:
        """Logs one step's ``metrics`` (collective with --log-params-norm); returns the values
        the console line shows when ``console`` (the step's metrics and the interval's)."""
        config = self.config
        metrics = dict(metrics)
        if config.log_params_norm:
            metrics["params-norm"] = params_l2_norm(self.model_chunks)
        if iteration % config.tensorboard_log_interval == 0:
            scalars = dict(metrics)
            if not config.log_loss_scale_to_tensorboard:
                scalars.pop("loss-scale", None)
            if config.log_world_size_to_tensorboard:
                scalars["world-size"] = float(self.world_size)
            self.writer.sample_scalars(scalars, iteration, consumed_samples)
            if config.log_memory_to_tensorboard:
                scalars.update(memory_metrics())  # no twins, as Megatron-LM
            self.writer.scalars(scalars, iteration)
        self.interval_seconds += seconds
        self.interval_steps += 1
        if not console:
            return metrics
        per_iteration = self.interval_seconds / self.interval_steps
        self.interval_seconds, self.interval_steps = 0.0, 0
        metrics["iteration-time"] = per_iteration
        timers = {"iteration-time": per_iteration}
        if config.log_throughput:
            # Megatron-LM: model TFLOP/s per GPU, i.e. per rank.
            throughput = self.flops_per_step / (per_iteration * 1e12 * self.world_size)
            metrics["throughput"] = timers["throughput"] = throughput
        if config.log_timers_to_tensorboard:
            self.writer.scalars(timers, iteration)
        return metrics
