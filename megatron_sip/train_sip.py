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
from functools import partial
from typing import Optional

from megatron_sip.arguments import JobConfig, parse_args, reject_set_flags
from megatron_sip.data.config import DataConfig
from megatron_sip.data.sip_dataset import SIPDataConfig, SIPSampleStream, build_sip_datasets
from megatron_sip.data.tokenizers import build_tokenizer
from megatron_sip.errors import ConfigError, exits_on_bad_input
from megatron_sip.inference.sampling import SamplingConfig
from megatron_sip.initialize import DistributedContext, destroy_distributed, initialize_distributed
from megatron_sip.log import print_rank_0, setup_logging
from megatron_sip.models.checkpointing import (
    checkpoint_extra,
    find_checkpoint,
    load_checkpoint,
    megatron_lm_args,
    resume_options,
)
from megatron_sip.models.gpt import build_gpt_model, transformer_config
from megatron_sip.platform import torch_device
from megatron_sip.roles.base import Judge, Rewriter
from megatron_sip.roles.config import (
    ColocationConfig,
    JudgeConfig,
    RewriterConfig,
    RoleContext,
    build_judge,
    build_rewriter,
)
from megatron_sip.roles.rewrite_store import RewriteStore
from megatron_sip.roles.self_check import check_judge, check_rewriter
from megatron_sip.training.loop import train
from megatron_sip.training.metrics import LoggingConfig, MetricWriter
from megatron_sip.training.setup import (
    TrainingSetup,
    setup_model_and_optimizer,
)
from megatron_sip.training.sip.batches import BatchBuilder
from megatron_sip.training.sip.candidates import CandidateCollector
from megatron_sip.training.sip.config import SIPConfig
from megatron_sip.training.sip.judging import CandidateJudge
from megatron_sip.training.sip.objectives import (
    JUDGE_SETTINGS,
    OBJECTIVES,
    REFERENCE_SETTINGS,
    ROLLOUT_SETTINGS,
    Objective,
)
from megatron_sip.training.sip.reference import EMAReference
from megatron_sip.training.sip.rewards import RewardConfig
from megatron_sip.training.sip.rewrites import RewriteSource
from megatron_sip.training.sip.rollouts import RolloutSampler
from megatron_sip.training.sip.score_store import judge_identity
from megatron_sip.training.sip.trainer import (
    CHECKPOINT_KEY,
    MissingGuard,
    SIPState,
    SIPTrainer,
)


@dataclasses.dataclass
class SIPJobConfig(JobConfig):
    """Every setting of a SIP run."""

    data: DataConfig
    sip_data: SIPDataConfig
    sip: SIPConfig
    sampling: SamplingConfig
    reward: RewardConfig
    judge: JudgeConfig
    rewriter: RewriterConfig
    colocation: ColocationConfig
    logging: LoggingConfig

    @property
    def objective(self) -> Objective:
        return OBJECTIVES[self.sip.sip_loss]

    def validate(self, world_size: int) -> None:
        """Beyond the base checks: settings the objective never reads are refused (a flag that
        is accepted and ignored hides a mistake)."""
        super().validate(world_size)
        objective, name = self.objective, f"--sip-loss {self.sip.sip_loss}"
        if not objective.needs_reference:
            reject_set_flags(self.sip, REFERENCE_SETTINGS, f"{name} uses no reference model")
        if not objective.needs_rollouts:
            reject_set_flags(self.sip, ROLLOUT_SETTINGS, f"{name} samples no rollouts")
            reject_set_flags(self.sampling, None, f"{name} samples no rollouts")
        if not objective.needs_judge:
            reason = f"{name} builds no judge"
            reject_set_flags(self.sip, JUDGE_SETTINGS, reason)
            reject_set_flags(self.reward, None, reason)
            reject_set_flags(self.judge, None, reason)
        if self.rewriter.rewriter_store:
            reject_set_flags(
                self.rewriter,
                [f.name for f in dataclasses.fields(self.rewriter) if f.name != "rewriter_store"],
                "--rewriter-store reads the rewrites: no rewriter is built",
            )
        colocated = (objective.needs_judge and self.judge.judge_backend == "megatron") or (
            not self.rewriter.rewriter_store and self.rewriter.rewriter_backend == "megatron"
        )
        if self.colocation.colocate_offload and not colocated:
            raise ConfigError(
                "--colocate-offload", "no colocated (megatron) judge or rewriter to offload"
            )
        if not self.data.data_path:
            raise ConfigError(
                "--data-path", "required (an indexed dataset prefix or weighted prefixes)"
            )
        reject_set_flags(
            self.data,
            [
                "data_cache_path",
                "num_workers",
                "mock_data",
                "mmap_bin_files",
                "create_attention_mask_in_dataloader",
                "dataloader_type",
            ],
            "SIP reads its (prefix, suffix) samples from the indexed documents itself, without "
            "Megatron's GPT dataset, its sample-index caches, mock data or loader workers",
        )


def sample_identity(config: SIPJobConfig) -> dict:
    """What decides a sample's text: a rewrite store or score cache made under other settings
    does not answer for this run."""
    data, sip_data = config.data, config.sip_data
    return {
        "data_path": list(data.data_path or []),
        "split": data.split,
        "seq_length": config.model.seq_length,
        "sip_suffix_len": sip_data.sip_suffix_len,
        "sip_split_point": sip_data.sip_split_point,
        "sip_min_prefix_len": sip_data.sip_min_prefix_len,
        "seed": config.training.seed,
        "tokenizer": [config.tokenizer.tokenizer_type, config.tokenizer.tokenizer_model],
    }


def build_reference(config: SIPJobConfig, job: TrainingSetup):
    """The EMA reference's fp32 shadow and the module its forward runs (the shadow itself in
    fp32 training, a model in the policy's dtype under --bf16), split like the policy."""

    def model(bf16: bool):
        layers = transformer_config(config.model, config.parallel, bf16=bf16)
        return build_gpt_model(config.model, layers, job.vocab_size, job.pg_collection)

    shadow = model(bf16=False)
    return shadow, model(bf16=True) if config.training.bf16 else shadow


def resume(config: SIPJobConfig, job: TrainingSetup, reference_shadow) -> tuple[SIPState, bool]:
    """(state, whether the reference was restored): a SIP checkpoint in --load resumes
    everything (with --finetune: its weights only); a pretraining checkpoint there or in
    --pretrained-checkpoint gives the weights."""
    checkpoint = config.checkpoint
    state = SIPState()
    iteration = find_checkpoint(checkpoint)
    extra = checkpoint_extra(checkpoint.load, iteration) if iteration is not None else None
    if extra is not None and CHECKPOINT_KEY in extra and not checkpoint.finetune:
        has_reference = extra[CHECKPOINT_KEY].get("has_reference", False)
        modules = {"reference": reference_shadow} if reference_shadow and has_reference else None
        loaded = load_checkpoint(
            checkpoint.load,
            job.model_chunks,
            job.optimizer,
            job.scheduler,
            **resume_options(checkpoint),
            extra_modules=modules,
        )
        state.restore(loaded.iteration, loaded.extra)
        print_rank_0(f"resuming SIP from {loaded.path} at iteration {loaded.iteration}")
        return state, modules is not None
    source = checkpoint.load if extra is not None else checkpoint.pretrained_checkpoint
    if source:
        if checkpoint_extra(source) is None:
            raise SystemExit(f"--pretrained-checkpoint: no checkpoint in {source}")
        step = iteration if source == checkpoint.load else None
        loaded = load_checkpoint(
            source, job.model_chunks, load_optim=False, load_rng=False, iteration=step
        )
        print_rank_0(f"continual SIP from the weights of {loaded.path} (iteration 0)")
    else:
        print_rank_0("SIP from scratch (random initialisation)")
    return state, False


@dataclasses.dataclass
class SIPJob:
    trainer: SIPTrainer
    state: SIPState
    roles: list  # judge and rewriter, closed at the end

    def close(self) -> None:
        for role in self.roles:
            role.close()


def build_roles(
    config: SIPJobConfig, context: DistributedContext
) -> tuple[Optional[Judge], Optional[Rewriter], Optional[RewriteStore], tuple]:
    """(judge, rewriter, rewrite store, rewriter identity): only what the objective uses."""
    roles = RoleContext(config.parallel, context.pg_collection, config.colocation.colocate_offload)
    rewriter = store = None
    if config.rewriter.rewriter_store:
        store = RewriteStore.load(config.rewriter.rewriter_store)
        store.check_identity(sample_identity(config), config.rewriter.rewriter_store)
        rewriter_id = ("store", config.rewriter.rewriter_store)
    else:
        rewriter = build_rewriter(config.rewriter, roles)
        rewriter_id = dataclasses.astuple(config.rewriter)
    judge = build_judge(config.judge, roles) if config.objective.needs_judge else None
    # Fail at start-up, before any step, when a role cannot answer.
    try:
        if rewriter is not None:
            check_rewriter(rewriter, config.rewriter, context.pg_collection.mp)
        if judge is not None:
            check_judge(judge, config.judge, context.pg_collection.mp)
    except BaseException:
        for role in (judge, rewriter):
            if role is not None:
                role.close()
        raise
    return judge, rewriter, store, rewriter_id


def kl_probe_available(config: SIPJobConfig) -> bool:
    """The KL estimate needs rollouts that are samples of the policy itself."""
    sampling = config.sampling
    own = sampling.sip_temperature == 1.0 and sampling.sip_top_p == 1.0 and not sampling.sip_top_k
    if config.objective.needs_reference and not own:
        print_rank_0(
            "sip/kl-rollouts is not reported: rollouts sampled with temperature/top-p/top-k "
            "are not samples of the policy"
        )
    return config.objective.needs_reference and own


def build_job(
    config: SIPJobConfig,
    context: DistributedContext,
    roles: Optional[tuple[Optional[Judge], Rewriter]] = None,
) -> SIPJob:
    """Everything a SIP run needs, from the parsed config (also what tests and benchmarks
    build). ``roles``: a (judge, rewriter) pair built by the caller in place of the configured
    ones, without their start-up self-check (the step benchmark's stand-ins, whose cost it does
    not count); the job closes them."""
    model_cfg, training, sip, objective = (
        config.model,
        config.training,
        config.sip,
        config.objective,
    )
    tokenizer = build_tokenizer(config.tokenizer)
    job = setup_model_and_optimizer(
        model_cfg,
        config.parallel,
        training,
        config.tokenizer,
        tokenizer.vocab_size,
        context,
        calculate_per_token_loss=True,
    )
    job.checkpoint_args = megatron_lm_args(
        config, padded_vocab_size=job.vocab_size, world_size=context.world_size
    )
    shadow = view = None
    if objective.needs_reference:
        shadow, view = build_reference(config, job)
    state, reference_restored = resume(config, job, shadow)
    reference = None
    if shadow is not None:
        reference = EMAReference(
            shadow,
            view,
            job.model_chunks[0],
            job.optimizer,
            sip,
            copy_policy=not reference_restored,
        )

    groups = context.pg_collection
    global_batch = training.global_batch(context.data_parallel_size)
    datasets = build_sip_datasets(
        config.data,
        config.sip_data,
        seq_length=model_cfg.seq_length,
        seed=training.seed,
        num_samples=[
            training.train_iters * global_batch,
            training.eval_iters * global_batch if training.eval_iters else 0,
            0,
        ],
    )

    def stream(dataset, consumed: int) -> SIPSampleStream:
        return SIPSampleStream(
            dataset,
            micro_batch_size=training.micro_batch_size,
            data_parallel_rank=context.data_parallel_rank,
            data_parallel_size=context.data_parallel_size,
            consumed_samples=consumed,
        )

    if roles is None:
        judge, rewriter, store, rewriter_id = build_roles(config, context)
    else:
        (judge, rewriter), store = roles, None
        rewriter_id = ("given", type(rewriter).__name__)
        if (judge is None) == config.objective.needs_judge:
            raise ValueError(
                f"--sip-loss {config.sip.sip_loss}: give a judge exactly when it uses one"
            )
    suffix_len = config.sip_data.sip_suffix_len
    judging = None
    if judge is not None:
        identity = judge_identity(
            dataclasses.astuple(config.judge), sorted(sample_identity(config).items()), rewriter_id
        )
        judging = CandidateJudge(judge, config.reward.objectives, identity, groups.mp)
    rollouts = None
    if objective.needs_rollouts:
        rollouts = RolloutSampler(
            job.model_chunks[0],
            config.sampling,
            sip.sip_num_rollouts,
            suffix_len,
            tokenizer.eod,
            tokenizer.vocab_size,
        )
    collector = CandidateCollector(
        objective=objective,
        sip=sip,
        reward=config.reward,
        tokenizer=tokenizer,
        rewrites=RewriteSource(tokenizer, suffix_len, rewriter, store, groups.mp),
        rollouts=rollouts,
        judging=judging,
    )
    parallel = config.parallel
    device = torch_device()
    batches = BatchBuilder(
        objective,
        sip,
        pad_id=tokenizer.eod,
        length_multiple=parallel.tensor_model_parallel_size if parallel.sequence_parallel else 1,
        device=device,
        kl_probe=kl_probe_available(config),
    )
    valid = datasets["valid"]
    if training.eval_iters and valid is None:
        print_rank_0(
            f"no validation documents in --split {config.data.split}: no evaluation "
            f"(--eval-iters {training.eval_iters} has nothing to read)"
        )
    trainer = SIPTrainer(
        job=job,
        objective=objective,
        collector=collector,
        batches=batches,
        reference=reference,
        stream=stream(datasets["train"], state.consumed_train_samples),
        sip=sip,
        training=training,
        judge_objectives=config.reward.objectives if objective.needs_judge else (),
        fused=sip.fused_logprob(device.type),
        guard=MissingGuard(
            max_missing_scores=sip.sip_max_missing_scores,
            max_missing_rewrites=sip.sip_max_missing_rewrites if rewriter is not None else None,
            window=sip.sip_missing_scores_window,
            describe=partial(describe_role_failures, judge, rewriter),
        ),
        valid_stream=(lambda: stream(valid, 0)) if valid is not None else None,
        seq_length=model_cfg.seq_length,
    )
    return SIPJob(trainer, state, [role for role in (judge, rewriter) if role is not None])


def describe_role_failures(*roles) -> str:
    """What the judge's and rewriter's clients counted (for the missing-score stop)."""
    parts = [role.describe_failures() for role in roles if hasattr(role, "describe_failures")]
    return "; ".join(parts) or "see the warnings above"


@exits_on_bad_input
def main(argv=None) -> None:
    config = parse_args(argv, SIPJobConfig, description=__doc__)
    context = initialize_distributed(config.parallel, config.platform.device, config.training.seed)
    setup_logging()
    context.announce()
    sip_job = build_job(config, context)
    writer = MetricWriter(config.logging, dataclasses.asdict(config))
    objective = config.objective
    what = [config.sip.sip_loss, f"N={config.sip_data.sip_suffix_len}"]
    if objective.needs_rollouts:
        what.append(f"K={config.sip.sip_num_rollouts}")
    if objective.needs_judge:
        what.append(f"objectives {config.reward.sip_objectives}")
    print_rank_0(
        f"SIP ({', '.join(what)}): world {context.world_size} on {context.device}, "
        f"TP={config.parallel.tensor_model_parallel_size} "
        f"PP={config.parallel.pipeline_model_parallel_size} DP={context.data_parallel_size}, "
        f"global batch {config.training.global_batch(context.data_parallel_size)} prefixes, "
        f"from iteration {sip_job.state.iteration} to {config.training.train_iters}"
    )
    try:
        train(
            sip_job.trainer.loop(config.checkpoint),
            sip_job.state,
            config.training,
            config.checkpoint,
            writer,
        )
    finally:
        writer.close()
        sip_job.close()
    destroy_distributed()


if __name__ == "__main__":
    main()
