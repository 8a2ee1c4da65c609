"""Distributed checkpoints (``--ckpt-format torch_dist``) with Megatron-LM's directory layout.

``<root>/iter_0000100/`` holds one checkpoint written by ``megatron.core.dist_checkpointing``:
the model and optimizer as sharded tensors in global coordinates (so a checkpoint saved at one
TP/PP loads at another), the LR schedule and iteration as common state, and each rank's RNG states.
``<root>/latest_checkpointed_iteration.txt`` names the newest complete one.

Crash safety: a checkpoint is written under ``iter_XXXXXXX.tmp`` and renamed into place only after
every rank has finished; the tracker file is replaced (write, fsync, rename) last. A save killed at
any point leaves the previous checkpoint and tracker untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed.data_parallel_base import _BaseDataParallel
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.module import Float16Module

from megatron_sip.data.config import TokenizerConfig
from megatron_sip.errors import ConfigError, require_choice
from megatron_sip.models.config import ModelConfig

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 1
# Optimizer state sharded like the model parameters, so it reshards across TP/PP/DP.
SHARDING_METADATA = {
    "singleton_local_shards": False,
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}


@dataclasses.dataclass
class CheckpointConfig:
    """Where checkpoints are written and read."""

    save: Optional[str] = None
    """Directory to save checkpoints to."""

    load: Optional[str] = None
    """Directory to load the latest checkpoint from (its tracker file picks the iteration)."""

    save_interval: Optional[int] = None
    """Save every this many iterations (and at the end of training)."""

    ckpt_format: Literal["torch_dist"] = "torch_dist"
    """Checkpoint format: torch_dist (Megatron-Core distributed checkpointing, reshardable)."""

    no_load_optim: bool = False
    """Do not load optimizer state from --load."""

    no_load_rng: bool = False
    """Do not load RNG states from --load."""

    finetune: bool = False
    """Load only the weights from --load and start at iteration 0 with a fresh optimizer, LR
    schedule and data order (continual pretraining from a base model)."""

    pretrained_checkpoint: Optional[str] = None
    """When --load holds no checkpoint, start from this checkpoint's weights only (iteration 0,
    fresh optimizer, LR schedule and data order): continual training from a base model. A
    checkpoint in --load (a resumed run) takes precedence."""

    def __post_init__(self):
        require_choice("--ckpt-format", self.ckpt_format, ("torch_dist",))
        if self.save_interval is not None:
            if self.save_interval <= 0:
                raise ConfigError("--save-interval", f"must be positive, got {self.save_interval}")
            if not self.save:
                raise ConfigError("--save-interval", "needs --save DIR to write checkpoints to")
        for flag, value in (
            ("--no-load-optim", self.no_load_optim),
            ("--no-load-rng", self.no_load_rng),
            ("--finetune", self.finetune),
        ):
            if value and not self.load:
                raise ConfigError(flag, "needs --load DIR (the checkpoint it applies to)")


def checkpoint_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_tracker(root: str | os.PathLike) -> Optional[int]:
    """Iteration of the newest complete checkpoint under ``root``, or None if there is none."""
    tracker = Path(root) / TRACKER_FILE
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}") from None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The bare module under Megatron's DDP / Float16 wrappers."""
    while isinstance(chunk, (_BaseDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def _groups(model_chunks: list):
    """The process groups the model was built with (Megatron-Core modules keep them)."""
    return unwrap_model(model_chunks[0]).pg_collection


def _parallel_layout(groups) -> dict:
    return {"tp": groups.tp.size(), "pp": groups.pp.size(), "dp": groups.dp.size()}


def rng_state() -> dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_rng_state(groups) -> ShardedObject:
    # One object per (pp, tp, dp) rank: each rank restores exactly its own generators.
    layout = _parallel_layout(groups)
    return ShardedObject(
        "rng_state",
        rng_state(),
        (layout["pp"], layout["tp"], layout["dp"]),
        (groups.pp.rank(), groups.tp.rank(), groups.dp.rank()),
        replica_id=0,
    )


def _model_keys(model_chunks: list) -> list[str]:
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _sharded_state_dict(
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    *,
    iteration: int,
    include_rng: bool,
    is_loading: bool,
    extra_common: Optional[dict] = None,
    extra_modules: Optional[dict] = None,
) -> dict:
    state: dict = {}
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        state[key] = unwrap_model(chunk).sharded_state_dict(metadata=SHARDING_METADATA)
    for key, module in (extra_modules or {}).items():
        # Other models of the same ranks (an EMA reference): their own key and tensor names.
        state[key] = unwrap_model(module).sharded_state_dict(
            prefix=f"{key}.", metadata=SHARDING_METADATA
        )
    if optimizer is not None:
        model_state = {k: v for k, v in state.items() if k.startswith("model")}
        if len(model_chunks) == 1:
            model_state = model_state["model"]
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata=SHARDING_METADATA
        )
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if include_rng:
        state["rng_state"] = _sharded_rng_state(_groups(model_chunks))
    state["iteration"] = iteration
    state["checkpoint_version"] = CHECKPOINT_VERSION
    state["parallel_layout"] = _parallel_layout(_groups(model_chunks))
    if extra_common:
        state["extra"] = extra_common
    return state


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _publish(tmp_dir: Path, final_dir: Path) -> None:
    """Moves a complete checkpoint into place (replacing an older one of the same iteration)."""
    stale = None
    if final_dir.exists():
        stale = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(final_dir, stale)
    os.rename(tmp_dir, final_dir)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def _update_tracker(root: Path, iteration: int) -> None:
    _write_text_atomically(root / TRACKER_FILE, f"{iteration}\n")


def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    *,
    extra_common: Optional[dict] = None,
    extra_modules: Optional[dict] = None,
) -> Path:
    """Saves a checkpoint of ``iteration`` under ``root`` (collective: every rank calls it).
    ``extra_modules`` ({name: module}) are saved beside the model, e.g. an EMA reference."""
    root = Path(root)
    final_dir = checkpoint_dir(root, iteration)
    tmp_dir = final_dir.with_name(final_dir.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        # Left by a save that was killed: never a valid checkpoint.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
    _barrier()
    state = _sharded_state_dict(
        model_chunks,
        optimizer,
        scheduler,
        iteration=iteration,
        include_rng=True,
        is_loading=False,
        extra_common=extra_common,
        extra_modules=extra_modules,
    )
    dist_checkpointing.save(state, str(tmp_dir))
    _barrier()
    if _rank() == 0:
        _publish(tmp_dir, final_dir)
        _update_tracker(root, iteration)
        logger.info("saved checkpoint of iteration %d to %s", iteration, final_dir)
    _barrier()
    return final_dir


def checkpoint_extra(root: str | os.PathLike) -> Optional[dict]:
    """The ``extra_common`` saved with the tracker's checkpoint under ``root`` (None: no
    checkpoint), read without loading any tensor."""
    iteration = read_tracker(root)
    if iteration is None:
        return None
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir(root, iteration)))
    return common.get("extra", {})


# ---- what a checkpoint says about its network -------------------------------------------------


def model_metadata(model: ModelConfig, tokenizer: TokenizerConfig) -> dict:
    """The architecture and tokenizer saved with every checkpoint (in ``extra_common``), so a
    role (judge, rewriter) or an evaluation can be loaded from the checkpoint alone. The one
    writer of these settings; :func:`saved_model_settings` is the one reader."""
    return {"model": dataclasses.asdict(model), "tokenizer": dataclasses.asdict(tokenizer)}


def saved_model_settings(root: str | os.PathLike) -> tuple[ModelConfig, TokenizerConfig]:
    """The model and tokenizer settings saved with the newest checkpoint under ``root``."""
    extra = checkpoint_extra(root)
    if extra is None:
        raise FileNotFoundError(f"{root}: no checkpoint (no {TRACKER_FILE})")
    missing = [key for key in ("model", "tokenizer") if key not in extra]
    if missing:
        raise ValueError(
            f"{root}: the checkpoint stores no {' or '.join(missing)} settings; give them in a "
            "flags file (--judge-model-args, --rewriter-model-args, --eval-model-args)"
        )
    return ModelConfig(**extra["model"]), TokenizerConfig(**extra["tokenizer"])


@dataclasses.dataclass
class LoadedCheckpoint:
    iteration: int
    path: Path
    rng_restored: bool
    optimizer_restored: bool
    extra: dict


def load_checkpoint(
    root: str | os.PathLike,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    *,
    load_optim: bool = True,
    load_rng: bool = True,
    iteration: Optional[int] = None,
    extra_modules: Optional[dict] = None,
) -> Optional[LoadedCheckpoint]:
    """Loads the tracker's checkpoint (or ``iteration``) into the given model/optimizer/schedule.

    Returns None when ``root`` has no checkpoint. RNG states are restored only when the parallel
    layout matches the saved one (each rank's generators have no counterpart otherwise).
    """
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            return None
    path = checkpoint_dir(root, iteration)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: checkpoint named by {Path(root) / TRACKER_FILE} is missing"
        )
    common = dist_checkpointing.load_common_state_dict(str(path))
    layout = _parallel_layout(_groups(model_chunks))
    same_layout = common.get("parallel_layout") == layout
    restore_rng = load_rng and same_layout
    if load_rng and not same_layout:
        logger.warning(
            "checkpoint layout %s differs from this run's %s: RNG states not restored",
            common.get("parallel_layout"),
            layout,
        )
    restore_optim = optimizer is not None and load_optim
    state = _sharded_state_dict(
        model_chunks,
        optimizer if restore_optim else None,
        scheduler if restore_optim else None,
        iteration=iteration,
        include_rng=restore_rng,
        is_loading=True,
        extra_modules=extra_modules,
    )
    loaded = dist_checkpointing.load(state, str(path))
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        unwrap_model(chunk).load_state_dict(loaded[key], strict=True)
    for key, module in (extra_modules or {}).items():
        prefix = f"{key}."
        state_dict = {name[len(prefix) :]: value for name, value in loaded[key].items()}
        unwrap_model(module).load_state_dict(state_dict, strict=True)
    if restore_optim:
        optimizer.load_state_dict(loaded["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if restore_rng:
        set_rng_state(loaded["rng_state"])
    _barrier()
    return LoadedCheckpoint(
        iteration=loaded["iteration"],
        path=path,
        rng_restored=restore_rng,
        optimizer_restored=restore_optim,
        extra=common.get("extra", {}),
    )
