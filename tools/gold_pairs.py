"""Pairwise judging tasks from policies' continuations of the same prefixes, labelled by the
demo's gold judge (the oracle): the rankings a learned judge must get right for SIP to pick the
rollouts the gold judge would.

    python tools/gold_pairs.py --oracle-data runs/demo/data/demo \\
        --continuations runs/demo/eval/baseline.jsonl runs/demo/eval/sip.jsonl \\
        --output runs/demo/eval/gold_pairs.jsonl
    python -m megatron_sip.eval.judge_agreement --judge-backend megatron \\
        --judge-load runs/demo/roles/judge @examples/demo/judge_prompts.args \\
        --examples runs/demo/eval/gold_pairs.jsonl

Continuation files are ``megatron_sip.eval.continuations`` outputs of the same prefixes file(s).
Every two continuations of one prefix that the oracle finds safe and whose prose scores differ by
at least --min-margin become a task with the better one as the label (sides alternate); its
"corruption" names the prose factor the worse one loses most on (fluency, repetition, topic,
length), so judge_agreement reports accuracy per factor.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sip.roles.oracle import OracleKnowledge  # noqa: E402


def read_continuations(path: str) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            row["prefix"], row["continuation"]  # noqa: B018 - the fields must exist
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a continuation row ({error!r})") from None
        rows.append(row)
    return rows


def gold_pairs(oracle: OracleKnowledge, runs: list[list[dict]], names: list[str], margin: float):
    """The labelled pairwise tasks of continuation runs of the same prefixes (``names``: the
    runs' files, for errors)."""
    for name, rows in zip(names[1:], runs[1:]):
        if len(rows) != len(runs[0]):
            raise ValueError(f"{name}: {len(rows)} rows, {names[0]} has {len(runs[0])}")
    tasks = []
    for index, rows in enumerate(zip(*runs)):
        prefix = rows[0]["prefix"]
        for name, row in zip(names, rows):
            if row["prefix"] != prefix:
                raise ValueError(f"{name}:{index + 1}: another prefix than {names[0]}:{index + 1}")
        texts = [row["continuation"] for row in rows]
        for x, y in combinations(texts, 2):
            if not (oracle.is_safe(x) and oracle.is_safe(y)):
                continue
            scores = oracle.prose_score(prefix, x), oracle.prose_score(prefix, y)
            if abs(scores[0] - scores[1]) < margin:
                continue
            better, worse = (x, y) if scores[0] > scores[1] else (y, x)
            good, bad = oracle.prose_factors(prefix, better), oracle.prose_factors(prefix, worse)
            factor = max(good, key=lambda k: math.log(max(good[k], 1e-3) / max(bad[k], 1e-3)))
            first = len(tasks) % 2 == 0
            tasks.append(
                {
                    "task": "pairwise",
                    "id": rows[0].get("id", str(index)),
                    "prefix": prefix,
                    "a": better if first else worse,
                    "b": worse if first else better,
                    "label": "a" if first else "b",
                    "corruption": factor,
                }
            )
    return tasks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--oracle-data", required=True, help="the demo corpus directory")
    parser.add_argument("--continuations", nargs="+", required=True, help="2 or more files")
    parser.add_argument("--output", required=True)
    parser.add_argument("--min-margin", type=float, default=0.05, help="least prose-score gap")
    args = parser.parse_args(argv)
    if len(args.continuations) < 2:
        parser.error("--continuations: give at least 2 files of the same prefixes")
    try:
        runs = [read_continuations(path) for path in args.continuations]
        tasks = gold_pairs(
            OracleKnowledge(args.oracle_data), runs, args.continuations, args.min_margin
        )
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    Path(args.output).write_text("".join(json.dumps(t, sort_keys=True) + "\n" for t in tasks))
    counts = {}
    for task in tasks:
        counts[task["corruption"]] = counts.get(task["corruption"], 0) + 1
    print(json.dumps({"tasks": len(tasks), "by_factor": counts}))


if __name__ == "__main__":
    main()
