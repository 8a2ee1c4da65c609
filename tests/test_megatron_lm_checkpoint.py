"""Checkpoints both ways with Megatron-LM (core_v0.16.1), which is not installed here: its side is
hand-built from megatron/training/checkpointing.py. ``generate_state_dict`` lays a checkpoint out
(args, checkpoint_version 3.0, iteration, model, optimizer, opt_param_scheduler, rng_state as one
list per (pp, tp) rank replicated over DP, content metadata naming the optimizer sharding);
``load_checkpoint`` reads the common state, checks ``args``, picks the optimizer sharding from the
content metadata and loads the state dict it generates the same way."""

from __future__ import annotations

import argparse
import copy
import random

import numpy as np
import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_sip.arguments import JobConfig, parse_args
from megatron_sip.errors import ConfigError
from megatron_sip.initialize import destroy_distributed
from megatron_sip.models import checkpointing
from megatron_sip.training.config import TrainingConfig

from . import workers
from .distributed import run_ranks
from .test_checkpointing import _probe, _train

THEIR_ITERATION, OUR_ITERATION = 7, 3
CONSUMED = 48
# tests/workers.tiny_llama as flags
MODEL_FLAGS = (
    "--num-layers 4 --hidden-size 64 --ffn-hidden-size 96 --num-attention-heads 4 "
    "--group-query-attention --num-query-groups 2 --seq-length 32 "
    "--position-embedding-type rope --normalization RMSNorm --swiglu "
    "--untie-embeddings-and-output-weights --disable-bias-linear --hidden-dropout 0 "
    "--attention-dropout 0 --transformer-impl local --tokenizer-type NullTokenizer "
    "--vocab-size 200 --use-distributed-optimizer --micro-batch-size 2"
).split()


def _their_args() -> argparse.Namespace:
    """The parts of Megatron-LM's parsed args its loader and load_args_from_checkpoint read."""
    return argparse.Namespace(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        group_query_attention=True,
        num_query_groups=2,
        kv_channels=16,
        seq_length=workers.SEQ,
        max_position_embeddings=workers.SEQ,
        position_embedding_type="rope",
        add_position_embedding=False,
        use_rotary_position_embeddings=True,
        rotary_base=10000,
        rotary_percent=1.0,
        normalization="RMSNorm",
        swiglu=True,
        untie_embeddings_and_output_weights=True,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tokenizer_type="NullTokenizer",
        tokenizer_model=None,
        vocab_size=200,
        padded_vocab_size=workers.VOCAB,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        data_parallel_size=2,
        world_size=2,
        use_distributed_optimizer=True,
        ckpt_format="torch_dist",
        consumed_train_samples=CONSUMED,
        consumed_valid_samples=0,
        no_save_optim=None,  # Megatron-LM's store_true flags default to None
        no_save_rng=None,
    )


def _their_rng_state(groups) -> ShardedObject:
    """Megatron-LM's get_rng_state (torch_dist, no expert parallelism)."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.get_rng_state(),  # the platform's CUDA RNG is the CPU one
        "rng_tracker_states": get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state",
        [state],
        (groups.pp.size(), groups.tp.size()),
        (groups.pp.rank(), groups.tp.rank()),
        replica_id=groups.dp.rank(),
    )


def _their_state_dict(args, chunks, optimizer, scheduler, metadata, *, is_loading, iteration):
    """Megatron-LM's generate_state_dict (torch_dist, one model chunk)."""
    state = {"args": args, "checkpoint_version": 3.0}
    if iteration is not None:
        state["iteration"] = iteration
    state["model"] = checkpointing.unwrap_model(chunks[0]).sharded_state_dict(metadata=metadata)
    state["optimizer"] = optimizer.sharded_state_dict(
        state, metadata=metadata, is_loading=is_loading
    )
    state["opt_param_scheduler"] = scheduler.state_dict()
    state["rng_state"] = _their_rng_state(checkpointing._groups(chunks))
    return state


def _adam_moments(optimizer) -> list:
    """This rank's Adam moments, in parameter order (the distributed optimizer's shards)."""
    moments = []
    for part in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        for group in part.optimizer.param_groups:
            for param in group["params"]:
                state = part.optimizer.state[param]
                moments.append((state["exp_avg"].clone(), state["exp_avg_sq"].clone()))
    assert moments
    return moments


def _params(chunks) -> dict:
    return {
        k: v.detach().clone() for k, v in chunks[0].module.state_dict().items() if v is not None
    }


def interchange_worker(root: str) -> None:
    parallel, context = workers.setup(tp=1, pp=1)
    groups = context.pg_collection
    training = TrainingConfig(
        micro_batch_size=workers.BATCH,
        lr=1e-2,
        train_iters=10,
        clip_grad=1.0,
        use_distributed_optimizer=True,
    )
    chunks, _, optimizer, scheduler = workers.build_with_optimizer(parallel, context, training)
    _train(chunks, optimizer, scheduler, 2)

    # ---- a checkpoint as Megatron-LM saves it, with its default dp_reshardable optimizer ----
    theirs = f"{root}/theirs"
    metadata = {
        "distrib_optim_sharding_type": "dp_reshardable",
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": groups.dp,
    }
    path = checkpointing.checkpoint_dir(theirs, THEIR_ITERATION)
    if context.rank == 0:
        path.mkdir(parents=True)
    torch.distributed.barrier()
    state = _their_state_dict(
        _their_args(),
        chunks,
        optimizer,
        scheduler,
        metadata,
        is_loading=False,
        iteration=THEIR_ITERATION,
    )
    state["num_floating_point_operations_so_far"] = 0
    content = {k: v for k, v in metadata.items() if k != "dp_cp_group"}
    dist_checkpointing.save(state, str(path), content_metadata=content)
    if context.rank == 0:
        (path.parent / checkpointing.TRACKER_FILE).write_text(str(THEIR_ITERATION))
    torch.distributed.barrier()
    rng_after_save = workers.draw_rng_sample()
    moments = _adam_moments(optimizer)
    expected = _probe(chunks, optimizer, scheduler)

    # ---- we resume it: weights, dp_reshardable optimizer state, schedule, RNG, samples ----
    torch.manual_seed(99)
    resumed = workers.build_with_optimizer(parallel, context, training)
    chunks, optimizer, scheduler = resumed[0], resumed[2], resumed[3]
    changed = copy.copy(scheduler)
    changed.max_lr = 2e-2
    with pytest.raises(ConfigError, match="--lr: checkpoint 0.01, flags 0.02"):
        checkpointing.load_checkpoint(theirs, chunks, optimizer, changed)
    loaded = checkpointing.load_checkpoint(theirs, chunks, optimizer, scheduler)
    assert loaded.iteration == THEIR_ITERATION
    assert loaded.optimizer_restored and loaded.rng_restored
    assert loaded.extra["consumed_train_samples"] == CONSUMED
    for key, value in workers.draw_rng_sample().items():
        torch.testing.assert_close(value, rng_after_save[key], atol=0, rtol=0, msg=key)
    for (avg, avg_sq), (saved_avg, saved_avg_sq) in zip(_adam_moments(optimizer), moments):
        torch.testing.assert_close(avg, saved_avg, atol=0, rtol=0)
        torch.testing.assert_close(avg_sq, saved_avg_sq, atol=0, rtol=0)
    assert scheduler.num_steps == 2 * workers.BATCH
    logits, loss_after_step = _probe(chunks, optimizer, scheduler)
    torch.testing.assert_close(logits, expected[0], atol=2e-5, rtol=1e-4)
    # One more step from the restored state matches: Adam's step count came back too.
    assert loss_after_step == pytest.approx(expected[1], rel=1e-4)

    # ---- we save ours; Megatron-LM's loader reads it ----
    ours = f"{root}/ours"
    config = parse_args(MODEL_FLAGS, JobConfig, world_size=2, exit_on_error=False)
    args = checkpointing.megatron_lm_args(
        config, padded_vocab_size=workers.VOCAB, world_size=context.world_size
    )
    args.consumed_train_samples = CONSUMED
    checkpointing.save_checkpoint(ours, OUR_ITERATION, chunks, optimizer, scheduler, args=args)
    saved_params = _params(chunks)
    saved_steps = scheduler.num_steps
    rng_after_save = workers.draw_rng_sample()
    _train(chunks, optimizer, scheduler, 1)  # move away from what was saved

    # _load_base_checkpoint(rank0=True): tracker, format, common state.
    tracker = (checkpointing.Path(ours) / checkpointing.TRACKER_FILE).read_text().strip()
    path = checkpointing.checkpoint_dir(ours, int(tracker))
    assert dist_checkpointing.check_is_distributed_checkpoint(str(path))
    common = dist_checkpointing.load_common_state_dict(str(path))
    saved_args = common["args"]
    assert isinstance(saved_args, argparse.Namespace)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == OUR_ITERATION
    assert common["num_floating_point_operations_so_far"] == 0
    # check_checkpoint_args, and the args load_checkpoint / load_args_from_checkpoint read.
    run = _their_args()
    for name in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "max_position_embeddings",
        "make_vocab_size_divisible_by",
        "padded_vocab_size",
        "tokenizer_type",
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "data_parallel_size",
        "world_size",
        "ffn_hidden_size",
        "seq_length",
        "num_query_groups",
        "group_query_attention",
        "kv_channels",
        "position_embedding_type",
        "rotary_base",
        "rotary_percent",
        "add_bias_linear",
        "swiglu",
        "untie_embeddings_and_output_weights",
        "normalization",
        "attention_dropout",
        "hidden_dropout",
        "consumed_train_samples",
        "consumed_valid_samples",
        "use_distributed_optimizer",
    ):
        assert getattr(saved_args, name) == getattr(run, name), name
    assert getattr(saved_args, "add_position_embedding", True) is False
    assert not getattr(saved_args, "no_save_rng", False)
    assert not getattr(saved_args, "no_save_optim", False)
    # The optimizer sharding comes from the content metadata; a fully reshardable format is
    # what lets Megatron-LM resume it at another TP/PP.
    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
    assert content["distrib_optim_sharding_type"] == "fully_reshardable"
    assert content["distrib_optim_sharding_type"] in (
        DistributedOptimizer.checkpoint_fully_reshardable_formats
    )
    assert set(common["opt_param_scheduler"]) >= {"max_lr", "min_lr", "lr_decay_steps"}
    # load_checkpoint: the sharded state dict it generates loads from our files.
    load_metadata = {**content, "dp_cp_group": groups.dp}
    request = _their_state_dict(
        argparse.Namespace(),
        chunks,
        optimizer,
        scheduler,
        load_metadata,
        is_loading=True,
        iteration=None,
    )
    loaded = dist_checkpointing.load(request, str(path))
    chunks[0].load_state_dict(loaded["model"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.use_checkpoint_opt_param_scheduler = False  # Megatron-LM's default: must match
    fresh = copy.copy(scheduler)
    fresh.num_steps = 0
    fresh.load_state_dict(loaded["opt_param_scheduler"])
    assert fresh.num_steps == saved_steps
    (rng,) = loaded["rng_state"]
    assert set(rng) == {
        "random_rng_state",
        "np_rng_state",
        "torch_rng_state",
        "cuda_rng_state",
        "rng_tracker_states",
    }
    checkpointing.set_rng_state(rng)
    for key, value in workers.draw_rng_sample().items():
        torch.testing.assert_close(value, rng_after_save[key], atol=0, rtol=0, msg=key)
    for key, value in _params(chunks).items():
        torch.testing.assert_close(value, saved_params[key], atol=0, rtol=0, msg=key)

    # ---- --no-save-optim --no-save-rng: left out, recorded in args, and so not restored ----
    lean = f"{root}/lean"
    checkpointing.save_checkpoint(
        lean, 1, chunks, optimizer, scheduler, args=args, save_optim=False, save_rng=False
    )
    path = checkpointing.checkpoint_dir(lean, 1)
    common = dist_checkpointing.load_common_state_dict(str(path))
    assert common["args"].no_save_optim and common["args"].no_save_rng
    assert "opt_param_scheduler" not in common
    saved_keys = load_sharded_metadata(str(path)).keys()  # tensors and objects
    assert any(key.startswith("decoder.") for key in saved_keys)
    assert not any(key.startswith(("optimizer", "rng_state")) for key in saved_keys)
    loaded = checkpointing.load_checkpoint(lean, chunks, optimizer, scheduler)
    assert not loaded.optimizer_restored and not loaded.rng_restored
    destroy_distributed()


def test_checkpoints_both_ways_with_megatron_lm(tmp_path):
    run_ranks(interchange_worker, 2, str(tmp_path))

    # --use-checkpoint-args takes their architecture while the flags are parsed: forced settings
    # over the flags (here at their defaults: LayerNorm, learned absolute positions, no SwiGLU,
    # no GQA, dropout 0.1, tied embeddings, biases), the others only where a flag was left unset
    # (load_args_from_checkpoint's _set_arg), so the shape flags may be left out altogether.
    flags = "--transformer-impl local --tokenizer-type NullTokenizer --vocab-size 100 "
    flags += f"--load {tmp_path / 'theirs'}"
    with pytest.raises(ConfigError, match="--num-layers: is required"):
        parse_args(flags.split(), JobConfig, world_size=1, exit_on_error=False)
    as_flagged = parse_args(
        [*flags.split(), "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "32"], JobConfig, world_size=1, exit_on_error=False,
    )  # fmt: skip
    assert as_flagged.model.swiglu is False  # not asked for: the flags as given
    config = parse_args(
        [*flags.split(), "--use-checkpoint-args", "--hidden-size", "64"],
        JobConfig, world_size=1, exit_on_error=False,
    )  # fmt: skip
    # max_position_embeddings and the other shape flags: unset, so filled from the checkpoint
    assert config.model == workers.tiny_llama(max_position_embeddings=workers.SEQ, kv_channels=16)
    assert config.tokenizer.vocab_size == 200
    # No checkpoint to read the settings from: an error naming the flag, not a guess.
    with pytest.raises(ConfigError, match="--use-checkpoint-args"):
        parse_args(
            ["--use-checkpoint-args", "--load", str(tmp_path / "nothing"), "--save",
             str(tmp_path / "nothing")], JobConfig, world_size=1, exit_on_error=False,
        )  # fmt: skip
