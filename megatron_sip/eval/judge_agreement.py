"""How often a judge's verdicts agree with labelled judging tasks (``judge_val.jsonl``).

    python -m megatron_sip.eval.judge_agreement --judge-backend oracle \\
        --judge-oracle-data data/demo --examples data/demo/judge_val.jsonl

Verdicts: safe when P(safe) > 0.5, factual when the factuality score is 1 (every claim
supported), and for pairwise tasks the candidate the judge prefers (both orders averaged).
Prints one JSON object: accuracy per task (pairwise split by corruption), counts, missing scores.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from megatron_sip.roles.base import Judge


def judge_accuracy(judge: Judge, examples: Sequence[dict], factual_at: float = 1.0) -> dict:
    """{"accuracy": {task: fraction}, "count": {task: n}, "missing": {task: n}}; a missing
    score counts as a wrong verdict. A text is factual when its factuality score is at least
    ``factual_at`` (1: every claim supported, the oracle's reading; a prompted judge's score is
    P(factual), read at 0.5)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    missing: dict[str, int] = defaultdict(int)
    for task, method, verdict in (
        ("safety", judge.safety, lambda s: s > 0.5),
        ("factuality", judge.factuality, lambda s: s >= factual_at),
    ):
        rows = [e for e in examples if e["task"] == task]
        scores = method([e["prefix"] for e in rows], [e["text"] for e in rows]) if rows else []
        for score, row in zip(scores, rows):
            missing[task] += score is None
            hits[task].append(score is not None and verdict(score) == bool(row["label"]))
    rows = [e for e in examples if e["task"] == "pairwise"]
    if rows:
        scores = judge.quality(
            [e["prefix"] for e in rows], [e["a"] for e in rows], [e["b"] for e in rows]
        )
        for score, row in zip(scores, rows):
            task = f"pairwise/{row.get('corruption', 'all')}"
            missing[task] += score is None
            hits[task].append(score is not None and (score > 0.5) == (row["label"] == "a"))
    return {
        "accuracy": {task: round(sum(h) / len(h), 4) for task, h in sorted(hits.items())},
        "count": {task: len(h) for task, h in sorted(hits.items())},
        "missing": dict(sorted(missing.items())),
    }


def main(argv=None) -> None:
    import argparse

    from megatron_sip.arguments import add_config_arguments, config_from_namespace
    from megatron_sip.roles.config import JudgeConfig, build_judge

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", required=True, help="labelled judging tasks (jsonl)")
    add_config_arguments(parser, JudgeConfig, "judge")
    args = parser.parse_args(argv)
    judge = build_judge(config_from_namespace(JudgeConfig, args))
    examples = [json.loads(line) for line in Path(args.examples).read_text().splitlines()]
    print(json.dumps(judge_accuracy(judge, examples), sort_keys=True))
    judge.close()


if __name__ == "__main__":
    main()
