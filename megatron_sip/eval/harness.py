"""lm-evaluation-harness's command line with the ``megatron_sip`` model registered.

    torchrun --nproc-per-node 2 -m megatron_sip.eval.harness --model megatron_sip \\
        --model_args load=runs/demo/sip,tensor_model_parallel_size=2 \\
        --tasks arc_easy --include_path tasks/ --batch_size 16 --output_path results/

Every argument is lm-eval's (``lm_eval --help``). lm-eval 0.4 finds models in its own registry
only, so its ``lm_eval`` command cannot load a plugin's model: this is that command with
``megatron_sip.eval.lm_eval_model`` imported first. Under torchrun every rank runs the
evaluation (the model is split over them); ranks other than global rank 0 drop
``--output_path`` and ``--log_samples`` so that one process writes the results.

No hub at run time: ``python -m megatron_sip.eval.benchmarks --write-tasks DIR --arc-easy-data
FILE ...`` writes lm-eval's own task configs of the benchmarks pointed at local files, for
``--include_path DIR --tasks local_arc_easy,...``.
"""

from __future__ import annotations

import os
import sys

WRITES = {"--output_path": True, "-o": True, "--log_samples": False, "-s": False}


def rank_arguments(argv: list[str], rank: int) -> list[str]:
    """``argv`` for this rank: unchanged on rank 0; without the output flags elsewhere."""
    if rank == 0:
        return list(argv)
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in WRITES:
            skip = WRITES[name] and "=" not in arg
            continue
        kept.append(arg)
    return kept


def main(argv=None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import megatron_sip.eval.lm_eval_model  # noqa: F401 - registers the model

    argv = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], *rank_arguments(argv, int(os.environ.get("RANK", "0")))]
    cli_evaluate()


if __name__ == "__main__":
    main()
