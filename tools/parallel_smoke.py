"""Builds the model at the given TP/PP, trains on one synthetic batch (resuming from --load,
saving every --save-interval), saves a distributed checkpoint to --save (a temporary directory if
not given), loads it back and checks the weights round-trip. Prints what it did.

    torchrun --nproc-per-node 2 tools/parallel_smoke.py @examples/tiny_llama_cpu.args \\
        --tensor-model-parallel-size 2 --save /tmp/smoke_ckpt --save-interval 5
    # then continue at another layout from the same checkpoint:
    torchrun --nproc-per-node 2 tools/parallel_smoke.py @examples/tiny_llama_cpu.args \\
        --pipeline-model-parallel-size 2 --load /tmp/smoke_ckpt --train-iters 15
"""

from __future__ import annotations

import itertools
import tempfile
import time

import torch

from megatron_sip.arguments import parse_args
from megatron_sip.initialize import destroy_distributed, initialize_distributed
from megatron_sip.log import print_rank_0, setup_logging
from megatron_sip.models.checkpointing import load_checkpoint, save_checkpoint
from megatron_sip.platform import torch_device
from megatron_sip.training.lm_loss import lm_forward_step
from megatron_sip.training.setup import setup_model_and_optimizer
from megatron_sip.training.step import train_step


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


def main(argv=None) -> None:
    configs = parse_args(argv, description=__doc__)
    model_cfg, training = configs.model, configs.training
    context = initialize_distributed(configs.parallel, configs.platform.device, training.seed)
    setup_logging()
    layout = context.describe()
    print_rank_0(
        f"world {context.world_size} on {context.device} ({layout['backend']}): "
        f"TP={layout['tp_size']} PP={layout['pp_size']} DP={layout['dp_size']}"
    )
    job = setup_model_and_optimizer(
        model_cfg,
        configs.parallel,
        training,
        configs.tokenizer,
        configs.tokenizer.vocab_size,
        context,
    )
    chunks, optimizer, scheduler = job.model_chunks, job.optimizer, job.scheduler
    local_params = sum(p.numel() for p in chunks[0].parameters())
    print_rank_0(f"model: {model_cfg.num_layers} layers, {local_params:,} parameters on rank 0")

    ckpt = configs.checkpoint
    save_root = ckpt.save
    if save_root is None:
        # One directory for all ranks: rank 0 makes it and tells the others.
        shared = [tempfile.mkdtemp(prefix="megatron_sip_smoke_") if context.rank == 0 else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        save_root = shared[0]
    first_iteration = 1
    if ckpt.load:
        loaded = load_checkpoint(
            ckpt.load,
            chunks,
            optimizer,
            scheduler,
            load_optim=not ckpt.no_load_optim,
            load_rng=not ckpt.no_load_rng,
        )
        if loaded is not None:
            first_iteration = loaded.iteration + 1
            print_rank_0(f"resumed from {loaded.path} (iteration {loaded.iteration})")

    num_microbatches = training.num_microbatches(context.data_parallel_size)
    batch = synthetic_batch(
        training.micro_batch_size, model_cfg.seq_length, configs.tokenizer.vocab_size, 0
    )
    last_iteration = max(training.train_iters, first_iteration)
    step_seconds = 0.0
    saved_path = None
    for iteration in range(first_iteration, last_iteration + 1):
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        result = train_step(
            lm_forward_step,
            itertools.repeat(batch),
            chunks,
            optimizer,
            scheduler,
            num_microbatches=num_microbatches,
            seq_length=model_cfg.seq_length,
            micro_batch_size=training.micro_batch_size,
            samples_per_step=training.global_batch(context.data_parallel_size),
        )
        step_seconds += time.perf_counter() - start
        if iteration % training.log_interval == 0 or iteration == last_iteration:
            print_rank_0(
                f"iteration {iteration}/{last_iteration}: lm loss {result.losses['lm loss']:.4f} "
                f"grad norm {result.grad_norm:.4f} lr {lr:.2e}"
            )
        if ckpt.save_interval and iteration % ckpt.save_interval == 0:
            saved_path = save_checkpoint(save_root, iteration, chunks, optimizer, scheduler)
    steps = last_iteration - first_iteration + 1
    print_rank_0(f"forward/backward/optimizer step: {step_seconds / steps:.3f} s per step")

    path = saved_path or save_checkpoint(save_root, last_iteration, chunks, optimizer, scheduler)
    before = [p.detach().clone() for p in chunks[0].parameters()]
    for param in chunks[0].parameters():
        param.data.zero_()
    loaded = load_checkpoint(save_root, chunks, optimizer, scheduler)
    same = all(torch.equal(a, p) for a, p in zip(before, chunks[0].parameters()))
    print_rank_0(
        f"checkpoint: saved {path}, loaded iteration {loaded.iteration}, "
        f"weights identical after reload: {same}"
    )
    destroy_distributed()
    if not same:
        raise SystemExit("checkpoint round trip changed the weights")


if __name__ == "__main__":
    main()
