"""Distributed checkpoints (``--ckpt-format torch_dist``) with Megatron-LM's directory layout and
contents, so Megatron-LM resumes ours and we resume theirs.

``<root>/iter_0000100/`` holds one checkpoint written by ``megatron.core.dist_checkpointing``, laid
out as Megatron-LM's ``generate_state_dict`` lays it out: ``args`` (an ``argparse.Namespace`` with
Megatron-LM's argument names), ``checkpoint_version`` (3.0), ``iteration``, ``model``,
``optimizer``, ``opt_param_scheduler``, ``rng_state`` (one object per pipeline/tensor rank,
replicated over data parallelism), ``num_floating_point_operations_so_far`` and the content
metadata that tells a loader how the optimizer state is sharded. Our own entries (the model and
tokenizer settings, consumed samples, skipped updates, a trainer's state) sit under ``extra``.
``<root>/latest_checkpointed_iteration.txt`` names the newest complete one.

Crash safety: a checkpoint is written under ``iter_XXXXXXX.tmp`` and renamed into place only after
every rank has finished; the tracker file is replaced (write, fsync, rename) last. Re-saving an
iteration that exists moves the old directory to ``iter_XXXXXXX.old`` first and the loader falls
back to it, so no kill leaves the tracker naming a missing or incomplete checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed.data_parallel_base import _BaseDataParallel
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.module import Float16Module
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_sip.data.config import TokenizerConfig
from megatron_sip.errors import ConfigError, require_choice
from megatron_sip.models.config import ModelConfig
from megatron_sip.training.exit import install_checkpoint_writer_queue

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
# Megatron-LM's current checkpoint version (its loader reorders QKV weights below 2.0 and reads
# the tensor-parallel size under another name below 3.0).
CHECKPOINT_VERSION = 3.0
# Before this project wrote Megatron-LM's layout: RNG per (pp, tp, dp) rank under our own keys.
_LEGACY_VERSION = 1
ITERATION_DIR = re.compile(r"iter_(\d{7,})")
# How model and optimizer tensors are sharded. The distributed optimizer's state is saved
# 'fully_reshardable' (like the model parameters, so it reshards across TP/PP/DP); Megatron-LM
# saves 'dp_reshardable' unless --dist-ckpt-optim-fully-reshardable, and both load here.
SHARDING_METADATA = {
    "singleton_local_shards": False,
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}
# What each schedule entry of a checkpoint is set by, for the changed-schedule error.
_SCHEDULE_FLAGS = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-iters/--lr-warmup-samples/--lr-warmup-fraction",
    "lr_decay_steps": "--lr-decay-iters/--lr-decay-samples/--train-iters",
    "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay/--start-weight-decay",
    "end_wd": "--weight-decay/--end-weight-decay",
    "wd_incr_steps": "--train-iters/--train-samples (weight-decay schedule)",
    "wd_incr_style": "--weight-decay-incr-style",
}


@dataclasses.dataclass
class CheckpointConfig:
    """Where checkpoints are written and read."""

    save: Optional[str] = None
    """Directory to save checkpoints to."""

    load: Optional[str] = None
    """Directory to load the latest checkpoint from (its tracker file picks the iteration). A
    directory that does not exist is an error unless it is also --save (a run that saves where
    it later resumes from); an existing one without a checkpoint starts from scratch."""

    save_interval: Optional[int] = None
    """Save every this many iterations (and at the end of training)."""

    ckpt_format: Literal["torch_dist"] = "torch_dist"
    """Checkpoint format: torch_dist (Megatron-Core distributed checkpointing, reshardable)."""

    ckpt_step: Optional[int] = None
    """Load this iteration from --load instead of the one its tracker file names."""

    no_load_optim: bool = False
    """Do not load optimizer state from --load."""

    no_load_rng: bool = False
    """Do not load RNG states from --load."""

    no_save_optim: bool = False
    """Do not save the optimizer state and LR schedule (a resume then starts a fresh optimizer
    and schedule)."""

    no_save_rng: bool = False
    """Do not save RNG states."""

    finetune: bool = False
    """Load only the weights from --load and start at iteration 0 with a fresh optimizer, LR
    schedule and data order (continual pretraining from a base model)."""

    pretrained_checkpoint: Optional[str] = None
    """When --load holds no checkpoint, start from this checkpoint's weights only (iteration 0,
    fresh optimizer, LR schedule and data order): continual training from a base model. A
    checkpoint in --load (a resumed run) takes precedence."""

    use_checkpoint_args: bool = False
    """Take the model architecture (and, unless --no-use-tokenizer-model-from-checkpoint-args,
    the tokenizer) from the args saved in the --load checkpoint (else --pretrained-checkpoint's)
    instead of the flags, as Megatron-LM's load_args_from_checkpoint does."""

    use_tokenizer_model_from_checkpoint_args: bool = True
    """With --use-checkpoint-args, also take --tokenizer-type and --tokenizer-model from the
    checkpoint."""

    exit_on_missing_checkpoint: bool = False
    """If --load is set but holds no checkpoint (and there is no --pretrained-checkpoint), stop
    with an error instead of training from random initialisation."""

    override_opt_param_scheduler: bool = dataclasses.field(
        default=False, metadata={"flag": "--override-opt_param-scheduler"}
    )
    """On resume, take the LR and weight-decay schedule (--lr, --min-lr, warmup, decay length and
    style, weight decay) from the flags, not the checkpoint. Without it or
    --use-checkpoint-opt_param-scheduler a schedule that differs from the checkpoint's is an
    error."""

    use_checkpoint_opt_param_scheduler: bool = dataclasses.field(
        default=False, metadata={"flag": "--use-checkpoint-opt_param-scheduler"}
    )
    """On resume, keep the checkpoint's LR and weight-decay schedule and ignore the schedule
    flags."""

    async_save: bool = False
    """Megatron-LM's asynchronous checkpoint save: refused here (see docs/training.md)."""

    def __post_init__(self):
        require_choice("--ckpt-format", self.ckpt_format, ("torch_dist",))
        if self.async_save:
            raise ConfigError(
                "--async-save",
                "not supported: checkpoints are written synchronously, and each is published "
                "(renamed into place, then the tracker updated) before training goes on; drop "
                "the flag",
            )
        if self.save_interval is not None:
            if self.save_interval <= 0:
                raise ConfigError("--save-interval", f"must be positive, got {self.save_interval}")
            if not self.save:
                raise ConfigError("--save-interval", "needs --save DIR to write checkpoints to")
        for flag, value in (
            ("--no-save-optim", self.no_save_optim),
            ("--no-save-rng", self.no_save_rng),
        ):
            if value and not self.save:
                raise ConfigError(flag, "needs --save DIR (the checkpoints it applies to)")
        for flag, value in (
            ("--no-load-optim", self.no_load_optim),
            ("--no-load-rng", self.no_load_rng),
            ("--finetune", self.finetune),
            ("--ckpt-step", self.ckpt_step is not None),
            ("--exit-on-missing-checkpoint", self.exit_on_missing_checkpoint),
        ):
            if value and not self.load:
                raise ConfigError(flag, "needs --load DIR (the checkpoint it applies to)")
        if self.ckpt_step is not None and self.ckpt_step < 0:
            raise ConfigError("--ckpt-step", f"must be an iteration >= 0, got {self.ckpt_step}")
        if self.use_checkpoint_args and not (self.load or self.pretrained_checkpoint):
            raise ConfigError(
                "--use-checkpoint-args", "needs --load or --pretrained-checkpoint to read args from"
            )
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ConfigError(
                "--override-opt_param-scheduler",
                "and --use-checkpoint-opt_param-scheduler contradict each other: pass one (flags "
                "win, or the checkpoint wins)",
            )


def checkpoint_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _fallback_dir(path: Path) -> Path:
    """Where a re-save keeps the previous checkpoint of the same iteration until the new one is
    in place."""
    return path.with_name(path.name + ".old")


def read_tracker(root: str | os.PathLike) -> Optional[int]:
    """Iteration of the newest complete checkpoint under ``root``, or None if there is none.
    A tracker that does not hold an iteration number is a :class:`ConfigError` naming it."""
    tracker = Path(root) / TRACKER_FILE
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        raise ConfigError(
            str(tracker),
            "names a Megatron-LM 'release' checkpoint, which is not supported here; convert it "
            "to an iter_0000000 checkpoint (rename release/ and write 0 into this file)",
        )
    if not text.isdigit():
        raise ConfigError(
            str(tracker),
            f"expected an iteration number, found {text[:40]!r}; write the iteration of an "
            f"existing iter_* directory of {root} into it, or delete it to start from scratch",
        )
    return int(text)


def is_complete(path: Path) -> bool:
    """A complete checkpoint (``dist_checkpointing`` writes its metadata.json last)."""
    return path.is_dir() and dist_checkpointing.check_is_distributed_checkpoint(str(path))


def _existing_checkpoint(root: str | os.PathLike, iteration: int, named_by: str) -> Path:
    """The directory holding ``iteration`` under ``root``: ``iter_N``, or the ``iter_N.old`` a
    re-save of N killed between its two renames left behind."""
    path = checkpoint_dir(root, iteration)
    if path.is_dir():
        return path
    fallback = _fallback_dir(path)
    if is_complete(fallback):
        logger.warning("%s is missing: loading %s (left by an interrupted re-save)", path, fallback)
        return fallback
    raise ConfigError(
        named_by,
        f"names iteration {iteration}, but {path} does not exist; pick an existing iteration "
        f"(ls {root}) and write it into {Path(root) / TRACKER_FILE} or pass --ckpt-step",
    )


def find_checkpoint(checkpoint: CheckpointConfig) -> Optional[int]:
    """The iteration to resume from --load (its tracker's, or --ckpt-step), or None when --load
    holds no checkpoint yet. Raises :class:`ConfigError` for what a Megatron-LM user would
    otherwise only find out from a run that trained from scratch: a --load that names one
    ``iter_*`` directory, a --load that does not exist (unless it is also --save), checkpoints
    without a tracker, a tracker naming a missing iteration, and --exit-on-missing-checkpoint."""
    if not checkpoint.load:
        return None
    load = Path(checkpoint.load)
    match = ITERATION_DIR.fullmatch(load.name)
    if match and (is_complete(load) or not (load / TRACKER_FILE).exists()):
        raise ConfigError(
            "--load",
            f"{load} is one checkpoint (an iter_* directory), not a checkpoint directory; pass "
            f"its parent and the iteration: --load {load.parent} --ckpt-step {int(match[1])}",
        )
    if not load.exists():
        if checkpoint.save and Path(checkpoint.save).resolve() == load.resolve():
            return None  # a fresh run that saves where it will later resume from
        raise ConfigError(
            "--load",
            f"{load} does not exist; fix the path, or, to start a run that resumes from its own "
            "checkpoints later, pass the same directory to --save",
        )
    if not load.is_dir():
        raise ConfigError("--load", f"{load} is not a directory")
    if checkpoint.ckpt_step is not None:
        _existing_checkpoint(load, checkpoint.ckpt_step, "--ckpt-step")
        return checkpoint.ckpt_step
    iteration = read_tracker(load)
    if iteration is not None:
        _existing_checkpoint(load, iteration, str(load / TRACKER_FILE))
        return iteration
    orphans = sorted(p.name for p in load.glob("iter_*") if is_complete(p))
    if orphans:
        raise ConfigError(
            str(load / TRACKER_FILE),
            f"is missing, but {load} holds checkpoints ({', '.join(orphans[-3:])}); write the "
            "iteration to resume from into it, or pass --ckpt-step",
        )
    if checkpoint.exit_on_missing_checkpoint and not checkpoint.pretrained_checkpoint:
        raise ConfigError(
            "--exit-on-missing-checkpoint",
            f"no checkpoint in --load {load} (no {TRACKER_FILE}); fix --load, or drop this flag "
            "to train from random initialisation",
        )
    return None


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


# ---- RNG ----------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This rank's generators under Megatron-LM's keys (``cuda_rng_state`` is None on CPU)."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": get_cuda_rng_tracker().get_states(),
    }


_LEGACY_RNG_KEYS = {
    "random": "random_rng_state",
    "numpy": "np_rng_state",
    "torch": "torch_rng_state",
    "cuda": "cuda_rng_state",
    "tracker": "rng_tracker_states",
}


def set_rng_state(state: dict) -> None:
    state = {_LEGACY_RNG_KEYS.get(key, key): value for key, value in state.items()}
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state["cuda_rng_state"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _sharded_rng_state(groups, version: float = CHECKPOINT_VERSION) -> ShardedObject:
    if version < CHECKPOINT_VERSION:  # our layout before Megatron-LM's: one object per rank
        layout = _parallel_layout(groups)
        state = {old: rng_state()[new] for old, new in _LEGACY_RNG_KEYS.items()}
        return ShardedObject(
            "rng_state",
            state,
            (layout["pp"], layout["tp"], layout["dp"]),
            (groups.pp.rank(), groups.tp.rank(), groups.dp.rank()),
            replica_id=0,
        )
    # As Megatron-LM (get_rng_state without expert parallelism): one list per (pp, tp) rank,
    # replicated over data (and context) parallelism, whose ranks are seeded alike.
    return ShardedObject(
        "rng_state",
        [rng_state()],
        (groups.pp.size(), groups.tp.size()),
        (groups.pp.rank(), groups.tp.rank()),
        replica_id=(getattr(groups, "dp_cp", None) or groups.dp).rank(),
    )


# ---- what Megatron-LM reads besides the tensors -------------------------------------------------


def _is_distributed_optimizer(optimizer) -> bool:
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(isinstance(part, DistributedOptimizer) for part in parts)


def content_metadata(optimizer) -> dict:
    """The content metadata Megatron-LM's save writes (``_build_sharded_state_dict_metadata``
    less its process group): its loader builds the model and optimizer state dicts from it."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if optimizer is not None and _is_distributed_optimizer(optimizer):
        metadata["distrib_optim_sharding_type"] = SHARDING_METADATA["distrib_optim_sharding_type"]
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = False
    return metadata


def _plain(value):
    """``value`` if it is made of types every loader unpickles under torch.load's weights_only
    (Megatron-Core registers Namespace), else None."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(
        item is None or isinstance(item, (bool, int, float, str)) for item in value
    ):
        return list(value)
    return None


def megatron_lm_args(job_config, *, padded_vocab_size: int, world_size: int) -> argparse.Namespace:
    """The ``args`` entry of a checkpoint, as Megatron-LM saves its parsed arguments: every
    setting of ``job_config`` (a JobConfig: its groups' field names are Megatron-LM's argument
    names) plus the derived values Megatron-LM's loader and load_args_from_checkpoint read."""
    values: dict = {}
    for group in dataclasses.fields(job_config):
        settings = getattr(job_config, group.name)
        if dataclasses.is_dataclass(settings):
            for field in dataclasses.fields(settings):
                values[field.name] = _plain(getattr(settings, field.name))
    model: ModelConfig = job_config.model
    training = getattr(job_config, "training", None)  # None: a converted model, not a run
    data_parallel_size = job_config.parallel.data_parallel_size(world_size)
    values.update(
        padded_vocab_size=padded_vocab_size,
        world_size=world_size,
        data_parallel_size=data_parallel_size,
        ffn_hidden_size=model.ffn_size(),
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        kv_channels=model.head_dim(),
        num_query_groups=model.query_groups() if model.group_query_attention else None,
        add_position_embedding=model.position_embedding_type == "learned_absolute",
        use_rotary_position_embeddings=model.position_embedding_type == "rope",
        add_bias_linear=not model.disable_bias_linear,
        global_batch_size=training.global_batch(data_parallel_size) if training else None,
        use_dist_ckpt=True,
        ckpt_format="torch_dist",
        consumed_train_samples=0,
        consumed_valid_samples=0,
        skipped_train_samples=0,
    )
    return argparse.Namespace(**values)


def _checkpoint_args(
    args: Optional[argparse.Namespace], groups, *, optimizer, save_optim: bool, save_rng: bool
) -> argparse.Namespace:
    """``args`` with the entries this save decides (Megatron-LM's loader reads the parallel
    sizes and whether optimizer and RNG states were saved)."""
    merged = argparse.Namespace(**vars(args)) if args is not None else argparse.Namespace()
    merged.tensor_model_parallel_size = groups.tp.size()
    merged.pipeline_model_parallel_size = groups.pp.size()
    merged.data_parallel_size = groups.dp.size()
    merged.world_size = dist.get_world_size() if dist.is_initialized() else 1
    merged.use_distributed_optimizer = optimizer is not None and _is_distributed_optimizer(
        optimizer
    )
    merged.no_save_optim = not save_optim
    merged.no_save_rng = not save_rng
    merged.ckpt_format = "torch_dist"
    merged.use_dist_ckpt = True
    return merged


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
    sharding: Optional[dict] = None,
    rng_version: float = CHECKPOINT_VERSION,
    extra_common: Optional[dict] = None,
    extra_modules: Optional[dict] = None,
) -> dict:
    groups = _groups(model_chunks)
    # A copy: Megatron-Core adds the data-parallel group to the dict it is given, in place.
    sharding = dict(sharding or SHARDING_METADATA)
    sharding.setdefault("dp_cp_group", getattr(groups, "dp_cp", None) or groups.dp)
    state: dict = {}
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        state[key] = unwrap_model(chunk).sharded_state_dict(metadata=sharding)
    for key, module in (extra_modules or {}).items():
        # Other models of the same ranks (an EMA reference): their own key and tensor names.
        state[key] = unwrap_model(module).sharded_state_dict(prefix=f"{key}.", metadata=sharding)
    if optimizer is not None:
        model_state = {k: v for k, v in state.items() if k.startswith("model")}
        if len(model_chunks) == 1:
            model_state = model_state["model"]
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata=sharding
        )
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if include_rng:
        state["rng_state"] = _sharded_rng_state(groups, rng_version)
    state["iteration"] = iteration
    state["checkpoint_version"] = CHECKPOINT_VERSION
    state["parallel_layout"] = _parallel_layout(groups)
    if extra_common:
        state["extra"] = extra_common
    return state


# ---- save -----------------------------------------------------------------------------------


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _publish(tmp_dir: Path, final_dir: Path) -> None:
    """Moves a complete checkpoint into place. An older checkpoint of the same iteration is kept
    as ``.old`` until the new one is in place: a kill between the renames leaves the tracker's
    iteration loadable from there (see :func:`_existing_checkpoint`)."""
    stale = _fallback_dir(final_dir)
    if final_dir.exists():
        if stale.exists():
            shutil.rmtree(stale)  # iter_N is complete, so an older .old is garbage
        os.rename(final_dir, stale)
    os.rename(tmp_dir, final_dir)
    shutil.rmtree(stale, ignore_errors=True)


def _clean_leftovers(root: Path) -> None:
    """What killed saves left: ``.tmp`` directories are never valid; an ``.old`` whose
    ``iter_N`` is missing is that iteration's only copy and is moved back."""
    for stale in root.glob("iter_*.old"):
        final = stale.with_name(stale.name[: -len(".old")])
        if final.exists():
            shutil.rmtree(stale, ignore_errors=True)
        elif is_complete(stale):
            os.rename(stale, final)


def _update_tracker(root: Path, iteration: int) -> None:
    _write_text_atomically(root / TRACKER_FILE, f"{iteration}\n")


def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    *,
    args: Optional[argparse.Namespace] = None,
    save_optim: bool = True,
    save_rng: bool = True,
    num_floating_point_operations_so_far: float = 0,
    extra_common: Optional[dict] = None,
    extra_modules: Optional[dict] = None,
) -> Path:
    """Saves a checkpoint of ``iteration`` under ``root`` (collective: every rank calls it).
    ``args`` (see :func:`megatron_lm_args`) is saved with the parallel sizes and save options
    filled in; ``save_optim`` / ``save_rng`` False leave out the optimizer and schedule / the RNG
    states (--no-save-optim / --no-save-rng). ``extra_modules`` ({name: module}) are saved beside
    the model, e.g. an EMA reference."""
    root = Path(root)
    final_dir = checkpoint_dir(root, iteration)
    tmp_dir = final_dir.with_name(final_dir.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(root)
        # Left by a save that was killed: never a valid checkpoint.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
    _barrier()
    groups = _groups(model_chunks)
    save_optim = save_optim and optimizer is not None
    state = _sharded_state_dict(
        model_chunks,
        optimizer if save_optim else None,
        scheduler if save_optim else None,
        iteration=iteration,
        include_rng=save_rng,
        is_loading=False,
        extra_common=extra_common,
        extra_modules=extra_modules,
    )
    state["args"] = _checkpoint_args(
        args, groups, optimizer=optimizer, save_optim=save_optim, save_rng=save_rng
    )
    state["num_floating_point_operations_so_far"] = num_floating_point_operations_so_far
    # Megatron-Core's writer helper process, started so that it dies with this one.
    install_checkpoint_writer_queue()
    dist_checkpointing.save(
        state, str(tmp_dir), content_metadata=content_metadata(optimizer if save_optim else None)
    )
    _barrier()
    if _rank() == 0:
        _publish(tmp_dir, final_dir)
        _update_tracker(root, iteration)
        logger.info("saved checkpoint of iteration %d to %s", iteration, final_dir)
    _barrier()
    return final_dir


# ---- what a checkpoint says about its network -------------------------------------------------


def _common_state(root: str | os.PathLike, iteration: Optional[int] = None) -> Optional[dict]:
    """The common (non-tensor) state of the tracker's checkpoint (or ``iteration``) under
    ``root``; None: no checkpoint."""
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            return None
    path = _existing_checkpoint(root, iteration, str(Path(root) / TRACKER_FILE))
    return dist_checkpointing.load_common_state_dict(str(path))


def checkpoint_extra(root: str | os.PathLike, iteration: Optional[int] = None) -> Optional[dict]:
    """The ``extra_common`` saved with the tracker's checkpoint (or ``iteration``) under ``root``
    (None: no checkpoint), read without loading any tensor."""
    common = _common_state(root, iteration)
    return None if common is None else common.get("extra", {})


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


# Megatron-LM's load_args_from_checkpoint, plus what a Hugging Face architecture needs that its list
# lacks (RoPE scaling, norm epsilon): (argument, force). Forced ones take the checkpoint's value
# over the flag; the others only fill a flag left unset.
_ARCH_ARGS = (
    ("num_layers", False),
    ("hidden_size", False),
    ("ffn_hidden_size", False),
    ("seq_length", False),
    ("num_attention_heads", False),
    ("num_query_groups", True),
    ("group_query_attention", True),
    ("kv_channels", False),
    ("max_position_embeddings", False),
    ("position_embedding_type", True),
    ("rotary_base", True),
    ("rotary_percent", True),
    ("rotary_interleaved", True),
    ("add_qkv_bias", True),
    ("qk_layernorm", True),
    ("use_rope_scaling", True),
    ("rope_scaling_factor", True),
    ("norm_epsilon", True),
    ("squared_relu", True),
    ("swiglu", True),
    ("untie_embeddings_and_output_weights", True),
    ("apply_layernorm_1p", True),
    ("normalization", True),
    ("attention_dropout", True),
    ("hidden_dropout", True),
)


# The tokenizer settings --use-checkpoint-args takes (Megatron-LM's, then those an imported Hugging
# Face model needs to tokenize and size its vocabulary as it was trained).
_TOKENIZER_ARGS = (
    "tokenizer_type",
    "tokenizer_model",
    "vocab_file",
    "merge_file",
    "vocab_size",
    "tokenizer_hf_include_special_tokens",
    "make_vocab_size_divisible_by",
    "model_vocab_size",
)


def checkpoint_arg_values(checkpoint: CheckpointConfig, values: dict) -> dict:
    """--use-checkpoint-args: the model and tokenizer settings to take from the ``args`` saved in
    the checkpoint to resume (--load's, else --pretrained-checkpoint's), as Megatron-LM's
    load_args_from_checkpoint sets them: the forced ones always, the others where the flag was
    left unset (None). ``values`` are the parsed flags by field name; returns {field: value}.
    :func:`megatron_sip.arguments.parse_args` applies them before any config is built, so the
    shape flags the checkpoint supplies may be left out, as in Megatron-LM."""
    if not checkpoint.use_checkpoint_args:
        return {}
    iteration = find_checkpoint(checkpoint)
    root = checkpoint.load if iteration is not None else checkpoint.pretrained_checkpoint
    common = _common_state(root, iteration) if root else None
    saved = (common or {}).get("args")
    if saved is None:
        raise ConfigError(
            "--use-checkpoint-args",
            f"{root or '--load'}: "
            + ("no checkpoint to take the model settings from" if common is None else
               "the checkpoint saved no args")
            + "; give the model flags instead",
        )  # fmt: skip
    model_fields = {field.name for field in dataclasses.fields(ModelConfig)}
    updates = {}
    for name, force in _ARCH_ARGS:
        value = getattr(saved, name, None)
        if value is None or name not in model_fields:
            continue
        if force or values.get(name) is None:
            updates[name] = value
    if hasattr(saved, "add_bias_linear"):
        updates["disable_bias_linear"] = not saved.add_bias_linear
    if hasattr(saved, "add_position_embedding") and not hasattr(saved, "position_embedding_type"):
        updates["position_embedding_type"] = (
            "learned_absolute" if saved.add_position_embedding else "none"
        )
    if checkpoint.use_tokenizer_model_from_checkpoint_args:
        for name in _TOKENIZER_ARGS:
            if getattr(saved, name, None) is not None:
                updates[name] = getattr(saved, name)
    changed = {k: v for k, v in updates.items() if values.get(k) != v}
    if changed and _rank() == 0:
        logger.warning(
            "--use-checkpoint-args: from the checkpoint: %s",
            ", ".join(f"{k}={v!r}" for k, v in changed.items()),
        )
    return updates


# ---- load -----------------------------------------------------------------------------------


class CheckpointReader:
    """Reads any box of the tensors of a torch_dist checkpoint, on one process and without
    collectives, whatever TP/PP it was saved at: whole tensors, one layer of Megatron-Core's
    layer-stacked ones ([num_layers, ...]), or some rows of a vocabulary tensor. Megatron-Core
    loads whole sharding grids collectively, so this reads through torch.distributed.checkpoint
    (the format under torch_dist) with a planner that asks for one box of each tensor."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata

    def __contains__(self, key: str) -> bool:
        return key in self.metadata

    def shape(self, key: str) -> tuple[int, ...]:
        meta = self.metadata.get(key)
        if meta is None or not hasattr(meta, "size"):
            raise ConfigError(str(self.path), f"holds no tensor {key}")
        return tuple(meta.size)

    def read_boxes(self, boxes: dict[str, tuple[list[int], list[int]]]) -> dict:
        """{key: tensor of the box (offsets, sizes)} of each saved tensor."""
        tensors = {
            key: torch.empty(sizes, dtype=self.metadata[key].properties.dtype)
            for key, (_, sizes) in boxes.items()
        }
        dcp.load(
            tensors,
            storage_reader=FileSystemReader(str(self.path)),
            planner=_BoxLoadPlanner({key: offsets for key, (offsets, _) in boxes.items()}),
            no_dist=True,
        )
        return tensors

    def read(self, keys: list[str], layer: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Whole tensors ``keys``, or with ``layer`` that layer of layer-stacked ones."""
        boxes = {}
        for key in keys:
            shape = list(self.shape(key))
            offsets = [0] * len(shape)
            if layer is not None:
                offsets[0], shape[0] = layer, 1
            boxes[key] = (offsets, shape)
        tensors = self.read_boxes(boxes)
        return {key: t[0] if layer is not None else t for key, t in tensors.items()}


class _BoxLoadPlanner(DefaultLoadPlanner):
    """A torch.distributed.checkpoint load planner that fills each tensor of the state dict
    from the box of the saved tensor at the given offsets (the box's size is the tensor's)."""

    def __init__(self, boxes: dict[str, list[int]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.boxes = boxes

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, tensor in self.state_dict.items():
            box = ChunkStorageMetadata(offsets=torch.Size(self.boxes[key]), sizes=tensor.size())
            meta = self.metadata.state_dict_metadata[key]
            items += create_read_items_for_chunk_list(key, meta, [box])
        return LoadPlan(items)

    def resolve_tensor(self, read_item) -> torch.Tensor:
        tensor = self.state_dict[read_item.dest_index.fqn]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            tensor = tensor.narrow(dim, offset, length)
        return tensor


# Tensors with one row per vocabulary id, padded to --make-vocab-size-divisible-by x TP.
_VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _split_vocab_tensors(state: dict, reader: CheckpointReader) -> dict:
    """Takes out of the sharded ``state`` the vocabulary tensors whose padded size differs from
    the checkpoint's (saved at another TP size: the padding is a multiple of 128 x TP), which
    Megatron-Core cannot reshard; returns {(model key, parameter name): ShardedTensor} for
    :func:`_read_vocab_rows`. Rows past the smaller size are padding on both sides."""
    split = {}
    for model_key, entries in state.items():
        if not isinstance(entries, dict) or model_key in ("optimizer", "opt_param_scheduler"):
            continue
        for name, sharded in list(entries.items()):
            key = getattr(sharded, "key", None)
            if key is None or not key.endswith(_VOCAB_TENSORS) or key not in reader:
                continue
            if reader.shape(key)[0] != sharded.global_shape[0]:
                split[(model_key, name)] = entries.pop(name)
    return split


def _read_vocab_rows(split: dict, reader: CheckpointReader) -> dict:
    """This rank's rows of each split-off vocabulary tensor: the saved rows it covers, zeros for
    padding rows the checkpoint does not have."""
    loaded = {}
    for (model_key, name), sharded in split.items():
        saved_rows = reader.shape(sharded.key)[0]
        start, rows = sharded.global_offset[0], sharded.local_shape[0]
        tensor = torch.zeros(sharded.local_shape, dtype=sharded.data.dtype)
        available = max(0, min(rows, saved_rows - start))
        if available:
            box = ([start] + [0] * (len(sharded.local_shape) - 1),
                   [available, *sharded.local_shape[1:]])  # fmt: skip
            tensor[:available] = reader.read_boxes({sharded.key: box})[sharded.key]
        loaded[(model_key, name)] = tensor.to(sharded.data.device)
    return loaded


@dataclasses.dataclass
class LoadedCheckpoint:
    iteration: int
    path: Path
    rng_restored: bool
    optimizer_restored: bool
    extra: dict
    args: Optional[argparse.Namespace] = None  # the checkpoint's Megatron-LM args


def _check_schedule(
    scheduler, saved: dict, *, override: bool, use_checkpoint: bool, path: Path
) -> None:
    """As Megatron-LM: a schedule that differs from the checkpoint's is an error unless the flags
    say which wins. Checked before any tensor is read, naming every difference."""
    if override or use_checkpoint:
        return
    changed = [
        f"{flag}: checkpoint {saved[key]!r}, flags {getattr(scheduler, key)!r}"
        for key, flag in _SCHEDULE_FLAGS.items()
        if key in saved and getattr(scheduler, key) != saved[key]
    ]
    if changed:
        raise ConfigError(
            "--load",
            f"the LR/weight-decay schedule differs from the one saved in {path} ("
            + "; ".join(changed)
            + "; steps count samples, so --global-batch-size changes them too). Pass "
            "--override-opt_param-scheduler to continue with the flags' schedule, or "
            "--use-checkpoint-opt_param-scheduler to keep the checkpoint's",
        )


def _load_sharding(common: dict, optimizer, layout_changed: bool, path: Path) -> dict:
    """How the checkpoint's model and optimizer tensors are sharded, from its content metadata
    (as Megatron-LM's loader reads it)."""
    saved = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
    if saved is None:
        if "parallel_layout" in common:  # ours, before content metadata was written
            return dict(SHARDING_METADATA)
        # Megatron-LM's fall-back for checkpoints older than Megatron-Core 0.13.
        fully_parallel = getattr(common.get("args"), "ckpt_fully_parallel_save", False)
        saved = {
            "distrib_optim_sharding_type": "fully_sharded_model_space"
            if fully_parallel
            else "dp_zero_gather_scatter"
        }
    sharding = {**SHARDING_METADATA, **saved}
    sharding_type = sharding["distrib_optim_sharding_type"]
    if (
        optimizer is not None
        and _is_distributed_optimizer(optimizer)
        and layout_changed
        and sharding_type not in DistributedOptimizer.checkpoint_fully_reshardable_formats
    ):
        raise ConfigError(
            "--load",
            f"the distributed-optimizer state in {path} is saved '{sharding_type}', which "
            "reshards only across data parallelism, and this run's TP/PP differ from the "
            "checkpoint's; resume at the checkpoint's TP/PP, or pass --no-load-optim",
        )
    return sharding


def load_checkpoint(
    root: str | os.PathLike,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    *,
    load_optim: bool = True,
    load_rng: bool = True,
    iteration: Optional[int] = None,
    override_scheduler: bool = False,
    use_checkpoint_scheduler: bool = False,
    extra_modules: Optional[dict] = None,
) -> Optional[LoadedCheckpoint]:
    """Loads the tracker's checkpoint (or ``iteration``) into the given model/optimizer/schedule:
    ours or one Megatron-LM wrote (its optimizer state in any sharding its content metadata
    names).

    Returns None when ``root`` has no checkpoint. RNG states are restored only when the tensor
    and pipeline parallel sizes match the saved ones (as Megatron-LM). A schedule that differs
    from the checkpoint's is a :class:`ConfigError` unless ``override_scheduler`` (the flags win)
    or ``use_checkpoint_scheduler`` (the checkpoint wins).
    """
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            return None
    path = _existing_checkpoint(root, iteration, str(Path(root) / TRACKER_FILE))
    common = dist_checkpointing.load_common_state_dict(str(path))
    saved_args = common.get("args")
    version = common.get("checkpoint_version", 0)
    groups = _groups(model_chunks)
    if saved_args is not None:
        saved_tp_pp = (
            getattr(saved_args, "tensor_model_parallel_size", 1),
            getattr(saved_args, "pipeline_model_parallel_size", 1),
        )
        same_layout = saved_tp_pp == (groups.tp.size(), groups.pp.size())
    else:
        saved_tp_pp = common.get("parallel_layout")
        same_layout = saved_tp_pp == _parallel_layout(groups)
    rng_saved = not getattr(saved_args, "no_save_rng", False)
    restore_rng = load_rng and same_layout and rng_saved
    if load_rng and rng_saved and not same_layout:
        logger.warning(
            "checkpoint layout %s differs from this run's: RNG states not restored", saved_tp_pp
        )
    optim_saved = not getattr(saved_args, "no_save_optim", False)
    restore_optim = optimizer is not None and load_optim and optim_saved
    if optimizer is not None and load_optim and not optim_saved:
        logger.warning("%s holds no optimizer state (--no-save-optim): fresh optimizer", path)
    restore_schedule = restore_optim and scheduler is not None and "opt_param_scheduler" in common
    if restore_schedule:
        _check_schedule(
            scheduler,
            common["opt_param_scheduler"],
            override=override_scheduler,
            use_checkpoint=use_checkpoint_scheduler,
            path=path,
        )
    sharding = _load_sharding(common, optimizer if restore_optim else None, not same_layout, path)
    state = _sharded_state_dict(
        model_chunks,
        optimizer if restore_optim else None,
        scheduler if restore_schedule else None,
        iteration=iteration,
        include_rng=restore_rng,
        is_loading=True,
        sharding=sharding,
        rng_version=version,
        extra_modules=extra_modules,
    )
    reader = CheckpointReader(path)
    vocab_split = _split_vocab_tensors(state, reader)
    if vocab_split and restore_optim:
        key = next(iter(vocab_split.values())).key
        raise ConfigError(
            "--load",
            f"{path} pads the vocabulary to {reader.shape(key)[0]} rows ({key}) and this run to "
            f"{next(iter(vocab_split.values())).global_shape[0]} (the padding is a multiple of "
            "--make-vocab-size-divisible-by x TP), so its optimizer state cannot be resharded: "
            "resume at the checkpoint's TP size, or pass --no-load-optim",
        )
    loaded = dist_checkpointing.load(state, str(path))
    for (model_key, name), tensor in _read_vocab_rows(vocab_split, reader).items():
        loaded[model_key][name] = tensor
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        unwrap_model(chunk).load_state_dict(loaded[key], strict=True)
    for key, module in (extra_modules or {}).items():
        prefix = f"{key}."
        state_dict = {name[len(prefix) :]: value for name, value in loaded[key].items()}
        unwrap_model(module).load_state_dict(state_dict, strict=True)
    if restore_optim:
        # No autograd: a 'dp_reshardable' state is copied into views of the parameters
        # themselves when the optimizer keeps no separate fp32 copy (fp32 training).
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        if restore_schedule:
            scheduler.override_opt_param_scheduler = override_scheduler
            scheduler.use_checkpoint_opt_param_scheduler = use_checkpoint_scheduler
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if restore_rng:
        rng = loaded["rng_state"]
        # Megatron-LM's layout holds a list (one entry without --data-parallel-random-init).
        set_rng_state(rng[0] if isinstance(rng, list) else rng)
    _barrier()
    extra = dict(common.get("extra", {}))
    if saved_args is not None and "consumed_train_samples" not in extra:
        # A Megatron-LM checkpoint: its data position is in its args.
        extra["consumed_train_samples"] = getattr(saved_args, "consumed_train_samples", 0)
    return LoadedCheckpoint(
        iteration=loaded["iteration"],
        path=path,
        rng_restored=restore_rng,
        optimizer_restored=restore_optim,
        extra=extra,
        args=saved_args,
    )


def resume_options(checkpoint: CheckpointConfig) -> dict:
    """:func:`load_checkpoint` keyword arguments that resume --load as its flags ask."""
    return {
        "load_optim": not checkpoint.no_load_optim,
        "load_rng": not checkpoint.no_load_rng,
        "iteration": checkpoint.ckpt_step,
        "override_scheduler": checkpoint.override_opt_param_scheduler,
        "use_checkpoint_scheduler": checkpoint.use_checkpoint_opt_param_scheduler,
    }
