"""Where training metrics go: the console (rank 0), TensorBoard and Weights & Biases."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from megatron_sip.log import rank

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LoggingConfig:
    """Metric sinks besides the console."""

    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars to this directory."""

    wandb_project: Optional[str] = None
    """Log to this Weights & Biases project (needs the wandb package)."""

    wandb_exp_name: Optional[str] = None
    """Weights & Biases run name."""


class MetricWriter:
    """Scalars to TensorBoard / W&B, written by global rank 0 only."""

    def __init__(self, config: LoggingConfig, run_config: Optional[dict] = None):
        self.tensorboard = None
        self.wandb = None
        if rank() != 0:
            return
        if config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=config.tensorboard_dir, max_queue=1000)
        if config.wandb_project:
            try:
                import wandb
            except ImportError:
                logger.warning("--wandb-project given but wandb is not installed: not logging")
            else:
                self.wandb = wandb.init(
                    project=config.wandb_project, name=config.wandb_exp_name, config=run_config
                )

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def flops_per_token(
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    seq_length: int,
    vocab_size: int,
    gated_mlp: bool,
) -> float:
    """Training FLOPs per token (forward + backward = 3x forward, 2 FLOPs per multiply-add):
    the dense matmuls of every layer and the output layer, plus attention scores and values."""
    head_dim = hidden_size // num_attention_heads
    attention = hidden_size * (hidden_size + 2 * num_query_groups * head_dim) + hidden_size**2
    mlp = (3 if gated_mlp else 2) * hidden_size * ffn_hidden_size
    dense = num_layers * (attention + mlp) + hidden_size * vocab_size
    scores_and_values = num_layers * 2 * seq_length * hidden_size
    return 6.0 * (dense + scores_and_values)
