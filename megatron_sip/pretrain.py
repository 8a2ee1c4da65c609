"""Next-token pretraining on indexed datasets: the baseline SIP is compared against, and the way
to make the base model for continual SIP. Runs under torchrun and under srun.

    torchrun --nproc-per-node 2 -m megatron_sip.pretrain @examples/tiny_llama_cpu.args \\
        --tensor-model-parallel-size 2 --data-path data/corpus_text_document --split 90,10,0 \\
        --save ckpt --save-interval 100 --tensorboard-dir tb
"""

from __future__ import annotations

import dataclasses

from megatron_sip.arguments import parse_args
from megatron_sip.data.config import DataConfig
from megatron_sip.data.gpt_data import batch_iterator, build_gpt_datasets, split_sample_counts
from megatron_sip.data.tokenizers import build_tokenizer
from megatron_sip.initialize import destroy_distributed, initialize_distributed
from megatron_sip.log import print_rank_0, setup_logging
from megatron_sip.models.checkpointing import load_checkpoint, read_tracker
from megatron_sip.platform import torch_device
from megatron_sip.training.lm_loss import lm_forward_step
from megatron_sip.training.loop import LoopInputs, TrainState, train
from megatron_sip.training.metrics import LoggingConfig, MetricWriter, flops_per_token
from megatron_sip.training.setup import setup_model_and_optimizer

EXTRA_GROUPS = {"data": DataConfig, "logging": LoggingConfig}


def resume(checkpoint, chunks, optimizer, scheduler) -> TrainState:
    """State to start from: --load's checkpoint (its weights only with --finetune), else the
    weights of --pretrained-checkpoint, else a fresh model."""
    if checkpoint.load and read_tracker(checkpoint.load) is not None:
        source, finetune = checkpoint.load, checkpoint.finetune
    elif checkpoint.pretrained_checkpoint:
        if read_tracker(checkpoint.pretrained_checkpoint) is None:
            raise SystemExit(
                f"--pretrained-checkpoint: no checkpoint in {checkpoint.pretrained_checkpoint}"
            )
        source, finetune = checkpoint.pretrained_checkpoint, True
    else:
        if checkpoint.load:
            print_rank_0(f"no checkpoint in {checkpoint.load}: starting from scratch")
        return TrainState()
    loaded = load_checkpoint(
        source,
        chunks,
        optimizer,
        scheduler,
        load_optim=not (checkpoint.no_load_optim or finetune),
        load_rng=not (checkpoint.no_load_rng or finetune),
    )
    if finetune:
        flag = "--finetune" if source == checkpoint.load else "--pretrained-checkpoint"
        print_rank_0(f"{flag}: weights from {loaded.path}, starting at iteration 0")
        return TrainState()
    print_rank_0(f"resuming from {loaded.path} at iteration {loaded.iteration}")
    return TrainState(loaded.iteration, loaded.extra.get("consumed_train_samples", 0))


def main(argv=None) -> None:
    configs = parse_args(argv, extra_groups=EXTRA_GROUPS, description=__doc__)
    model_cfg, training, data = configs.model, configs.training, configs.data
    if not data.data_path:
        raise SystemExit("--data-path: required (an indexed dataset prefix or weighted prefixes)")
    context = initialize_distributed(configs.parallel, configs.platform.device, training.seed)
    setup_logging()
    context.announce()

    tokenizer = build_tokenizer(configs.tokenizer)
    job = setup_model_and_optimizer(
        model_cfg, configs.parallel, training, configs.tokenizer, tokenizer.vocab_size, context
    )
    state = resume(configs.checkpoint, job.model_chunks, job.optimizer, job.scheduler)

    global_batch = training.global_batch(context.data_parallel_size)
    datasets = build_gpt_datasets(
        data,
        tokenizer,
        seq_length=model_cfg.seq_length,
        seed=training.seed,
        num_samples=split_sample_counts(training.train_iters, training.eval_iters, global_batch),
    )

    def batches(dataset, consumed):
        return batch_iterator(
            dataset,
            consumed_samples=consumed,
            micro_batch_size=training.micro_batch_size,
            data_parallel_rank=context.data_parallel_rank,
            data_parallel_size=context.data_parallel_size,
            num_workers=data.num_workers,
            device=torch_device(),
        )

    flops = None
    if context.device == "cuda":
        flops = model_cfg.seq_length * flops_per_token(
            model_cfg.num_layers,
            model_cfg.hidden_size,
            model_cfg.ffn_size(),
            model_cfg.num_attention_heads,
            model_cfg.query_groups(),
            model_cfg.seq_length,
            job.vocab_size,
            model_cfg.swiglu,
        )
    inputs = LoopInputs(
        forward_step_func=lm_forward_step,
        model_chunks=job.model_chunks,
        optimizer=job.optimizer,
        scheduler=job.scheduler,
        train_batches=batches(datasets.train, state.consumed_train_samples),
        valid_batches=(lambda: batches(datasets.valid, 0)) if datasets.valid else None,
        seq_length=model_cfg.seq_length,
        data_parallel_size=context.data_parallel_size,
        flops_per_sample=flops,
        # The architecture and tokenizer travel with the weights, so a role (judge, rewriter)
        # can be loaded from the checkpoint alone.
        checkpoint_metadata={
            "model": dataclasses.asdict(model_cfg),
            "tokenizer": dataclasses.asdict(configs.tokenizer),
        },
    )
    run_config = {name: dataclasses.asdict(cfg) for name, cfg in vars(configs).items()}
    writer = MetricWriter(configs.logging, run_config)
    print_rank_0(
        f"pretraining: world {context.world_size} on {context.device}, "
        f"TP={configs.parallel.tensor_model_parallel_size} "
        f"PP={configs.parallel.pipeline_model_parallel_size} DP={context.data_parallel_size}, "
        f"global batch {global_batch}, from iteration {state.iteration} to {training.train_iters}"
    )
    try:
        train(inputs, state, training, configs.checkpoint, writer)
    finally:
        writer.close()
    destroy_distributed()


if __name__ == "__main__":
    main()
