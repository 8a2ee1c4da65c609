"""Self-Improving Pretraining: the policy continues prefixes, a judge scores its rollouts against
the original suffix and a rewrite, and the best candidate is trained toward (online DPO against an
EMA reference, RF-NLL, or SFT on the rewrite). Runs under torchrun and under srun.

    torchrun --nproc-per-node 2 -m megatron_sip.train_sip @examples/tiny_llama_cpu.args \\
        --data-path data/corpus_text_document --split 98,2,0 \\
        --pretrained-checkpoint base_ckpt --save sip_ckpt --save-interval 50 \\
        --sip-loss online_dpo --sip-num-rollouts 4 --sip-suffix-len 32 \\
        --sip-objectives quality,safety,factuality \\
        --judge-backend oracle --judge-oracle-data data/demo \\
        --rewriter-backend oracle --rewriter-oracle-data data/demo
"""

from __future__ import annotations

import dataclasses

from megatron_sip.arguments import parse_args
from megatron_sip.data.config import DataConfig
from megatron_sip.data.sip_dataset import SIPDataConfig, SIPSampleStream, build_sip_datasets
from megatron_sip.data.tokenizers import build_tokenizer
from megatron_sip.inference.sampling import SamplingConfig
from megatron_sip.initialize import destroy_distributed, initialize_distributed
from megatron_sip.log import print_rank_0, setup_logging
from megatron_sip.models.checkpointing import checkpoint_extra, load_checkpoint
from megatron_sip.models.gpt import build_gpt_model
from megatron_sip.platform import torch_device
from megatron_sip.roles.config import (
    ColocationConfig,
    JudgeConfig,
    RewriterConfig,
    build_judge,
    build_rewriter,
)
from megatron_sip.roles.rewards import RewardConfig, judge_identity
from megatron_sip.roles.rewrite_store import RewriteStore
from megatron_sip.training.metrics import LoggingConfig, MetricWriter
from megatron_sip.training.setup import setup_model_and_optimizer
from megatron_sip.training.sip.candidates import CandidateCollector, CandidateSources
from megatron_sip.training.sip.config import SIPConfig
from megatron_sip.training.sip.reference import EMAReference
from megatron_sip.training.sip.trainer import CHECKPOINT_KEY, SIPState, SIPTrainer

EXTRA_GROUPS = {
    "data": DataConfig,
    "sip_data": SIPDataConfig,
    "sip": SIPConfig,
    "sampling": SamplingConfig,
    "reward": RewardConfig,
    "judge": JudgeConfig,
    "rewriter": RewriterConfig,
    "colocation": ColocationConfig,
    "logging": LoggingConfig,
}


def sample_identity(configs) -> dict:
    """What decides a sample's text: a rewrite store or score cache made under other settings
    does not answer for this run."""
    data, sip_data = configs.data, configs.sip_data
    return {
        "data_path": list(data.data_path or []),
        "split": data.split,
        "seq_length": configs.model.seq_length,
        "sip_suffix_len": sip_data.sip_suffix_len,
        "sip_split_point": sip_data.sip_split_point,
        "sip_min_prefix_len": sip_data.sip_min_prefix_len,
        "seed": configs.training.seed,
        "tokenizer": [configs.tokenizer.tokenizer_type, configs.tokenizer.tokenizer_model],
    }


def resume(configs, job, reference_module) -> tuple[SIPState, bool]:
    """(state, whether the reference was restored): a SIP checkpoint in --load resumes
    everything; a pretraining checkpoint there or in --pretrained-checkpoint gives the weights."""
    checkpoint = configs.checkpoint
    state = SIPState()
    extra = checkpoint_extra(checkpoint.load) if checkpoint.load else None
    if extra is not None and CHECKPOINT_KEY in extra:
        has_reference = extra[CHECKPOINT_KEY].get("has_reference", False)
        modules = {"reference": reference_module} if reference_module and has_reference else None
        loaded = load_checkpoint(
            checkpoint.load,
            job.model_chunks,
            job.optimizer,
            job.scheduler,
            load_optim=not checkpoint.no_load_optim,
            load_rng=not checkpoint.no_load_rng,
            extra_modules=modules,
        )
        state.iteration = loaded.iteration
        state.restore(loaded.extra)
        print_rank_0(f"resuming SIP from {loaded.path} at iteration {loaded.iteration}")
        return state, modules is not None
    source = checkpoint.load if extra is not None else checkpoint.pretrained_checkpoint
    if source:
        if checkpoint_extra(source) is None:
            raise SystemExit(f"--pretrained-checkpoint: no checkpoint in {source}")
        loaded = load_checkpoint(source, job.model_chunks, load_optim=False, load_rng=False)
        print_rank_0(f"continual SIP from the weights of {loaded.path}")
    else:
        print_rank_0("SIP from scratch (random initialisation)")
    return state, False


@dataclasses.dataclass
class SIPJob:
    trainer: SIPTrainer
    state: SIPState
    roles: list  # judge and rewriter, closed at the end


def build_job(configs, context) -> SIPJob:
    """Everything a SIP run needs, from the parsed configs (also what tests build)."""
    model_cfg, training, sip = configs.model, configs.training, configs.sip
    tokenizer = build_tokenizer(configs.tokenizer)
    job = setup_model_and_optimizer(
        model_cfg, configs.parallel, training, configs.tokenizer, tokenizer.vocab_size, context
    )
    reference_module = None
    if sip.sip_loss == "online_dpo":
        reference_module = build_gpt_model(
            model_cfg, job.transformer_config, job.vocab_size, pg_collection=context.pg_collection
        )
    objectives = configs.reward.objectives
    state, reference_restored = resume(configs, job, reference_module)
    reference = None
    if reference_module is not None:
        reference = EMAReference(
            reference_module, job.model_chunks[0], sip, copy_policy=not reference_restored
        )

    global_batch = training.global_batch(context.data_parallel_size)
    datasets = build_sip_datasets(
        configs.data,
        configs.sip_data,
        seq_length=model_cfg.seq_length,
        seed=training.seed,
        num_samples=[training.train_iters * global_batch, 0, 0],
    )
    stream = SIPSampleStream(
        datasets["train"],
        micro_batch_size=training.micro_batch_size,
        data_parallel_rank=context.data_parallel_rank,
        data_parallel_size=context.data_parallel_size,
        consumed_samples=state.consumed_train_samples,
    )

    identity = sample_identity(configs)
    rewriter, rewrite_store = None, None
    if configs.rewriter.rewriter_store:
        rewrite_store = RewriteStore.load(configs.rewriter.rewriter_store)
        rewrite_store.check_identity(identity, configs.rewriter.rewriter_store)
        rewriter_id = ("store", configs.rewriter.rewriter_store)
    else:
        rewriter = build_rewriter(
            configs.rewriter,
            parallel=configs.parallel,
            offload=configs.colocation.colocate_offload,
        )
        rewriter_id = dataclasses.astuple(configs.rewriter)
    judge = None
    if sip.sip_loss != "sft_rewrite":
        judge = build_judge(
            configs.judge, parallel=configs.parallel, offload=configs.colocation.colocate_offload
        )
    sources = CandidateSources(
        policy=job.model_chunks[0],
        tokenizer=tokenizer,
        vocab_size=tokenizer.vocab_size,
        sip=sip,
        sampling=configs.sampling,
        reward=configs.reward,
        suffix_len=configs.sip_data.sip_suffix_len,
        judge=judge,
        judge_identity=judge_identity(
            dataclasses.astuple(configs.judge), sorted(identity.items()), rewriter_id
        ),
        score_store=state.score_store,
        rewriter=rewriter,
        rewrite_store=rewrite_store,
    )
    parallel = configs.parallel
    trainer = SIPTrainer(
        job=job,
        collector=CandidateCollector(sources),
        reference=reference,
        stream=stream,
        sip=sip,
        training=training,
        objectives=objectives,
        seq_length_multiple=(
            parallel.tensor_model_parallel_size if parallel.sequence_parallel else 1
        ),
        pad_id=tokenizer.eod,
        device=torch_device(),
        checkpoint_metadata={
            "model": dataclasses.asdict(model_cfg),
            "tokenizer": dataclasses.asdict(configs.tokenizer),
        },
    )
    return SIPJob(trainer, state, [role for role in (judge, rewriter) if role is not None])


def main(argv=None) -> None:
    configs = parse_args(argv, extra_groups=EXTRA_GROUPS, description=__doc__)
    if not configs.data.data_path:
        raise SystemExit("--data-path: required (an indexed dataset prefix or weighted prefixes)")
    context = initialize_distributed(
        configs.parallel, configs.platform.device, configs.training.seed
    )
    setup_logging()
    context.announce()
    sip_job = build_job(configs, context)
    parallel, sip = configs.parallel, configs.sip
    run_config = {name: dataclasses.asdict(cfg) for name, cfg in vars(configs).items()}
    writer = MetricWriter(configs.logging, run_config)
    print_rank_0(
        f"SIP ({sip.sip_loss}, K={sip.sip_num_rollouts}, N={configs.sip_data.sip_suffix_len}, "
        f"objectives {configs.reward.sip_objectives}): world {context.world_size} on "
        f"{context.device}, TP={parallel.tensor_model_parallel_size} "
        f"PP={parallel.pipeline_model_parallel_size} DP={context.data_parallel_size}, "
        f"global batch {configs.training.global_batch(context.data_parallel_size)} prefixes, "
        f"from iteration {sip_job.state.iteration} to {configs.training.train_iters}"
    )
    try:
        sip_job.trainer.train(sip_job.state, configs.checkpoint, writer)
    finally:
        writer.close()
        for role in sip_job.roles:
            role.close()
    destroy_distributed()


if __name__ == "__main__":
    main()
