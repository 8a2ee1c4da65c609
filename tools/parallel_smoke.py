"""Builds the model at the given TP/PP, trains on one synthetic batch through the training loop
(resuming from --load, saving every --save-interval), saves a distributed checkpoint to --save (a
temporary directory if not given), loads it back and checks the weights round-trip. Prints what
it did.

    torchrun --nproc-per-node 2 tools/parallel_smoke.py @examples/tiny_llama_cpu.args \\
        --tokenizer-type NullTokenizer --vocab-size 512 \\
        --tensor-model-parallel-size 2 --save /tmp/smoke_ckpt --save-interval 5
    # then continue at another layout from the same checkpoint:
    torchrun --nproc-per-node 2 tools/parallel_smoke.py @examples/tiny_llama_cpu.args \\
        --tokenizer-type NullTokenizer --vocab-size 512 \\
        --pipeline-model-parallel-size 2 --load /tmp/smoke_ckpt --train-iters 15
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
import time

import torch

from megatron_sip.arguments import JobConfig, parse_args
from megatron_sip.data.tokenizers import build_tokenizer
from megatron_sip.errors import ConfigError, exits_on_bad_input
from megatron_sip.initialize import destroy_distributed, initialize_distributed
from megatron_sip.log import print_rank_0, setup_logging
from megatron_sip.models.checkpointing import load_checkpoint, megatron_lm_args
from megatron_sip.platform import torch_device
from megatron_sip.training.loop import train
from megatron_sip.training.metrics import LoggingConfig, MetricWriter
from megatron_sip.training.next_token import next_token_trainer
from megatron_sip.training.setup import resume, setup_model_and_optimizer


def synthetic_batch(batch_size: int, seq_length: int, vocab_size: int, seed: int) -> dict:
    """One fixed batch of random tokens: memorising it makes the loss fall step by step."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_length + 1), generator=generator)
    device = torch_device()
    positions = torch.arange(seq_length).unsqueeze(0).expand(batch_size, -1)
    return {
        "tokens": tokens[:, :-1].to(device),
        "labels": tokens[:, 1:].to(device),
        "loss_mask": torch.ones(batch_size, seq_length, device=device),
        "position_ids": positions.to(device),
    }


@exits_on_bad_input
def main(argv=None) -> None:
    config = parse_args(argv, JobConfig, description=__doc__)
    model_cfg, training = config.model, config.training
    if config.tokenizer.tokenizer_type != "NullTokenizer":
        raise ConfigError("--tokenizer-type", "the smoke test trains on random ids: NullTokenizer")
    context = initialize_distributed(config.parallel, config.platform.device, training.seed)
    setup_logging()
    layout = context.describe()
    print_rank_0(
        f"world {context.world_size} on {context.device} ({layout['backend']}): "
        f"TP={layout['tp_size']} PP={layout['pp_size']} DP={layout['dp_size']}"
    )
    vocab_size = build_tokenizer(config.tokenizer).vocab_size
    job = setup_model_and_optimizer(
        model_cfg, config.parallel, training, config.tokenizer, vocab_size, context
    )
    job.checkpoint_args = megatron_lm_args(
        config, padded_vocab_size=job.vocab_size, world_size=context.world_size
    )
    chunks = job.model_chunks
    local_params = sum(p.numel() for p in chunks[0].parameters())
    print_rank_0(f"model: {model_cfg.num_layers} layers, {local_params:,} parameters on rank 0")

    checkpoint = config.checkpoint
    if checkpoint.save is None:
        # One directory for all ranks: rank 0 makes it and tells the others.
        shared = [tempfile.mkdtemp(prefix="megatron_sip_smoke_") if context.rank == 0 else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        checkpoint = dataclasses.replace(checkpoint, save=shared[0])
    state = resume(checkpoint, job)
    batch = synthetic_batch(training.micro_batch_size, model_cfg.seq_length, vocab_size, 0)
    trainer = next_token_trainer(
        job, training, checkpoint, seq_length=model_cfg.seq_length,
        train_batches=itertools.repeat(batch),
    )  # fmt: skip
    start, first = time.perf_counter(), state.iteration
    # Always one step at least, so that a run resumed at --train-iters still checks its save.
    training.train_iters = max(training.train_iters, first + 1)
    state = train(trainer, state, training, checkpoint, MetricWriter(LoggingConfig()))
    seconds = (time.perf_counter() - start) / max(1, state.iteration - first)
    print_rank_0(f"training: {seconds:.3f} s per step (checkpoint saves included)")

    before = [p.detach().clone() for p in chunks[0].parameters()]
    for param in chunks[0].parameters():
        param.data.zero_()
    loaded = load_checkpoint(checkpoint.save, chunks, job.optimizer, job.scheduler)
    same = all(torch.equal(a, p) for a, p in zip(before, chunks[0].parameters()))
    print_rank_0(
        f"checkpoint: saved {loaded.path}, loaded iteration {loaded.iteration}, "
        f"weights identical after reload: {same}"
    )
    destroy_distributed()
    if not same:
        raise SystemExit("checkpoint round trip changed the weights")


if __name__ == "__main__":
    main()
