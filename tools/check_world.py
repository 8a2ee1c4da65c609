"""Joins the job's process group and prints, per rank, the world megatron-sip sees.

Use it to check a launch before a long job:

    srun --ntasks 8 python tools/check_world.py --tensor-model-parallel-size 2
    torchrun --nproc-per-node 2 tools/check_world.py --device cpu --tensor-model-parallel-size 2

Each rank prints one JSON line: launcher, ranks, TP/PP/DP layout, and the result of an all-reduce
over the world (the sum of all ranks), which proves the process group works.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_sip.arguments import LaunchConfig, parse_args
from megatron_sip.errors import exits_on_bad_input
from megatron_sip.initialize import destroy_distributed, initialize_distributed
from megatron_sip.platform import torch_device


@exits_on_bad_input
def main(argv=None) -> None:
    configs = parse_args(argv, LaunchConfig, description=__doc__)
    context = initialize_distributed(configs.parallel, configs.platform.device)
    total = torch.tensor([float(context.rank)], device=torch_device())
    dist.all_reduce(total)
    line = json.dumps({**context.describe(), "all_reduce_rank_sum": total.item()}) + "\n"
    # One write call: lines from ranks sharing a pipe never interleave.
    os.write(sys.stdout.fileno(), line.encode())
    destroy_distributed()


if __name__ == "__main__":
    main()
