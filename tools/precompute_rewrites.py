"""Runs the frozen rewriter once over the SIP samples a run will train on and writes a rewrite
store, so that training reads rewrites instead of running the rewriter (METHOD step 2).

Takes the training run's own flags (the same @args file), plus --rewrite-store-output:

    python tools/precompute_rewrites.py @run.args --rewriter-backend oracle \\
        --rewriter-oracle-data data/demo --rewrite-store-output data/rewrites.jsonl
    torchrun --nproc-per-node 2 -m megatron_sip.train_sip @run.args \\
        --rewriter-store data/rewrites.jsonl

A colocated (megatron) rewriter runs under torchrun with the run's TP/PP layout; rank 0 writes.
The samples are those of --train-iters x --global-batch-size at --seed (every data-parallel
rank's share), keyed by (dataset, document, split point).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from megatron_sip.arguments import parse_args  # noqa: E402
from megatron_sip.data.sip_dataset import build_sip_datasets  # noqa: E402
from megatron_sip.data.tokenizers import build_tokenizer  # noqa: E402
from megatron_sip.errors import ConfigError, exits_on_bad_input  # noqa: E402
from megatron_sip.initialize import destroy_distributed, initialize_distributed  # noqa: E402
from megatron_sip.log import print_rank_0, rank, setup_logging  # noqa: E402
from megatron_sip.roles.config import RoleContext, build_rewriter  # noqa: E402
from megatron_sip.roles.rewrite_store import write_rewrite_store  # noqa: E402
from megatron_sip.roles.self_check import check_rewriter  # noqa: E402
from megatron_sip.train_sip import SIPJobConfig, sample_identity  # noqa: E402
from megatron_sip.training.sip.rewrites import sample_texts  # noqa: E402


@dataclasses.dataclass
class PrecomputeConfig:
    """Where the rewrites go."""

    rewrite_store_output: str = ""
    """Path of the rewrite store to write (jsonl; written to a temporary file, then renamed)."""

    rewrite_batch_size: int = 32
    """Samples per rewriter call."""

    def __post_init__(self):
        if not self.rewrite_store_output:
            raise ConfigError("--rewrite-store-output", "required: the store file to write")
        if self.rewrite_batch_size <= 0:
            raise ConfigError("--rewrite-batch-size", "must be positive")


@dataclasses.dataclass
class PrecomputeJobConfig(SIPJobConfig):
    """The training run's settings, plus where the rewrites go."""

    precompute: PrecomputeConfig

    def validate(self, world_size: int) -> None:
        if self.rewriter.rewriter_store:
            raise ConfigError("--rewriter-store", "give the rewriter to run, not a store to read")
        super().validate(world_size)


@exits_on_bad_input
def main(argv=None) -> None:
    configs = parse_args(argv, PrecomputeJobConfig, description=__doc__)
    context = initialize_distributed(
        configs.parallel, configs.platform.device, configs.training.seed
    )
    setup_logging()
    tokenizer = build_tokenizer(configs.tokenizer)
    global_batch = configs.training.global_batch(context.data_parallel_size)
    train_iters = configs.training.set_train_iters(context.data_parallel_size)
    dataset = build_sip_datasets(
        configs.data,
        configs.sip_data,
        seq_length=configs.model.seq_length,
        seed=configs.training.seed,
        num_samples=[train_iters * global_batch, 0, 0],
    )["train"]
    rewriter = build_rewriter(
        configs.rewriter, RoleContext(configs.parallel, context.pg_collection)
    )
    try:
        check_rewriter(rewriter, configs.rewriter, context.pg_collection.mp)
    except BaseException:
        rewriter.close()
        raise
    batch_size = configs.precompute.rewrite_batch_size
    rows, missing = {}, 0
    for start in tqdm(range(0, len(dataset), batch_size), disable=rank() != 0, desc="rewrites"):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        fresh = [s for s in samples if s.key not in rows]
        if not fresh:
            continue
        texts = [sample_texts(tokenizer, s) for s in fresh]  # as the trainer shows them
        rewrites = rewriter.rewrite([p for p, _ in texts], [o for _, o in texts])
        for sample, rewrite in zip(fresh, rewrites):
            rows[sample.key] = rewrite
            missing += rewrite is None
    rewriter.close()
    if rank() == 0:
        output = configs.precompute.rewrite_store_output
        count = write_rewrite_store(output, sample_identity(configs), rows.items())
        print_rank_0(f"wrote {count} rewrites ({missing} missing) to {output}")
    destroy_distributed()


if __name__ == "__main__":
    main()
