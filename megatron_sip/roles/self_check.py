"""Start-up self-checks of the judge and the rewriter: a job never trains on a role that cannot
answer.

A prompted judge (colocated or served) scores a labelled calibration set: the prompt pack's own
(``calibration.jsonl``) or ``--judge-calibration FILE``, in the schema of ``judge_val.jsonl``
(``{"task": "safety"|"factuality", "prefix", "text", "label": 0|1}`` or ``{"task": "pairwise",
"prefix", "a", "b", "label": "a"|"b"}``). Any missing score stops the run (nothing listening,
verdicts that are not among the served top log-probs, an answer in another format), and so does
an accuracy below ``--judge-min-calibration-accuracy``; with 0 there, a few placeholder prompts
only check that every verdict comes back. Verdict strings that are not single tokens of a
colocated judge's tokenizer are refused earlier, when the judge is built. A prompted rewriter
rewrites two short texts and must answer both. The oracle needs no check: its rules read the
corpus's labels.

Each check runs as the role is called in training (:func:`~megatron_sip.roles.base.call_role`), so
every rank of a model-parallel group reaches the same verdict.
"""

from __future__ import annotations

import json
import time
from typing import Optional

from megatron_sip.errors import ConfigError, RoleCheckError
from megatron_sip.eval.judge_agreement import judge_accuracy
from megatron_sip.log import print_rank_0
from megatron_sip.roles.base import Judge, Rewriter, call_role
from megatron_sip.roles.prompts import PromptedJudge

_PROBES = [
    {"task": "safety", "prefix": "The weather report.", "text": "It will rain.", "label": 1},
    {"task": "factuality", "prefix": "Geography.", "text": "Paris is in France.", "label": 1},
    {"task": "pairwise", "prefix": "The recipe.", "a": "Mix the flour.", "b": "Stir it.",
     "label": "a"},
]  # fmt: skip
_REWRITE_PROBES = [
    ("The town council met on Tuesday.", "They approved a budget for the library."),
    ("The match ended in a draw.", "Both teams played well."),
]
_FIELDS = {"safety": ("prefix", "text"), "factuality": ("prefix", "text"),
           "pairwise": ("prefix", "a", "b")}  # fmt: skip
_LABELS = {"safety": (0, 1), "factuality": (0, 1), "pairwise": ("a", "b")}


def load_calibration(path: str) -> list[dict]:
    """Labelled judging tasks from a JSONL file; a malformed line is an error naming it."""
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from None
            task = example.get("task") if isinstance(example, dict) else None
            if task not in _FIELDS:
                raise ValueError(f"{path}:{number}: 'task' must be one of {', '.join(_FIELDS)}")
            missing = [f for f in _FIELDS[task] if not isinstance(example.get(f), str)]
            if missing or example.get("label") not in _LABELS[task]:
                raise ValueError(
                    f"{path}:{number}: a {task} task needs text fields {', '.join(_FIELDS[task])} "
                    f"and a label in {_LABELS[task]}"
                )
            examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no calibration tasks")
    return examples


def _describe(role) -> str:
    describe = getattr(role, "describe_failures", None)
    return describe() if describe is not None else getattr(role, "identity", type(role).__name__)


def check_judge(judge: Judge, config, group=None) -> Optional[dict]:
    """Scores the calibration set (collective over ``group`` as the judge is); raises
    :class:`RoleCheckError` on a missing score or an accuracy below the bar. Returns the report
    ({"accuracy", "count", "missing", "overall", "source"}); None for a judge that is not
    prompted (the oracle)."""
    if not isinstance(judge, PromptedJudge):
        return None
    bar = config.judge_min_calibration_accuracy
    source = config.judge_calibration or judge.prompts.calibration
    if source is None and bar > 0:
        raise ConfigError(
            "--judge-calibration",
            f"prompt pack {judge.prompts.source} ships no calibration set: give labelled judging "
            "tasks (e.g. the judge_val.jsonl of the judge's data) or "
            "--judge-min-calibration-accuracy 0 to check only that verdicts come back",
        )
    if source is not None:
        try:
            examples = load_calibration(source)
        except (OSError, ValueError) as error:
            raise ConfigError("--judge-calibration", str(error)) from None
    else:
        examples, source = _PROBES, "placeholder prompts"
    start = time.perf_counter()
    report = call_role(
        lambda: judge_accuracy(judge, examples, factual_at=0.5), judge.collective, group
    )
    seconds = time.perf_counter() - start
    counts, missing = report["count"], sum(report["missing"].values())
    overall = sum(report["accuracy"][t] * counts[t] for t in counts) / sum(counts.values())
    report.update(overall=overall, source=str(source))
    by_task = ", ".join(f"{task} {value:.2f}" for task, value in report["accuracy"].items())
    if missing:
        raise RoleCheckError(
            f"judge self-check: {missing} of {sum(counts.values())} calibration tasks from "
            f"{source} got no score; the judge cannot judge ({_describe(judge)}). Check that the "
            "server answers, that its model writes the pack's verdicts as single tokens at the "
            "answer position (--judge-prompt-dir: the pack for this model), and the logs above"
        )
    if overall < bar:
        raise RoleCheckError(
            f"judge self-check: accuracy {overall:.2f} on {sum(counts.values())} calibration tasks "
            f"from {source} ({by_task}) is below --judge-min-calibration-accuracy {bar}: a judge "
            "this poor would train the policy on noise (wrong pack or model?)"
        )
    print_rank_0(
        f"judge self-check passed: {sum(counts.values())} tasks from {source}, accuracy "
        f"{overall:.2f} ({by_task}), no missing score, {seconds:.1f} s"
    )
    return report


def check_rewriter(rewriter: Rewriter, config, group=None) -> Optional[dict]:
    """Two short rewrites that must both come back; raises :class:`RoleCheckError` otherwise.
    None for the oracle rewriter."""
    from megatron_sip.roles.oracle import OracleRewriter

    if isinstance(rewriter, OracleRewriter):
        return None
    prefixes, suffixes = zip(*_REWRITE_PROBES)
    start = time.perf_counter()
    rewrites = call_role(
        lambda: rewriter.rewrite(list(prefixes), list(suffixes)), rewriter.collective, group
    )
    missing = sum(rewrite is None for rewrite in rewrites)
    if missing:
        raise RoleCheckError(
            f"rewriter self-check: {missing} of {len(rewrites)} probe rewrites did not come back "
            f"({_describe(rewriter)}); the rewriter cannot rewrite"
        )
    print_rank_0(
        f"rewriter self-check passed: {len(rewrites)} probe rewrites in "
        f"{time.perf_counter() - start:.1f} s (first: {rewrites[0][:80]!r})"
    )
    return {"rewrites": rewrites}
