"""The demo's report: the baseline-vs-SIP table, SIP's training curves and a comparison plot.

:func:`write_report` writes, each file atomically, into one directory:

- ``report.json``: ``{"results": <compare() output>, "meta": {...}}``;
- ``report.md``: the results table (safety, factuality, quality win rate with its 95% interval;
  baseline vs SIP) and the run's meta data (commands, iterations, wall time ...);
- ``reward.png``: SIP's rewards per iteration (:data:`REWARD_TAGS`, those that were logged);
- ``safety.png``: SIP's safety scores per iteration (every ``sip/safety/*`` tag);
- ``comparison.png``: safety and factuality bars, baseline vs SIP, and the win-rate bar with its
  interval against the 50% line.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from megatron_sip.eval.continuations import write_atomically

REWARD_TAGS = (
    "sip/reward/original-mean",
    "sip/reward/rewrite-mean",
    "sip/reward/rollout-mean",
    "sip/reward/rollout-max",
)
SAFETY_PREFIX = "sip/safety/"
SAFETY_TAG = "sip/safety/rollout-mean"

Curves = Mapping[str, Mapping[str, Mapping[int, float]]]  # run -> tag -> {iteration: value}


def read_scalars(tensorboard_dir: str | os.PathLike) -> dict[str, dict[int, float]]:
    """Every scalar logged to a TensorBoard directory: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(tensorboard_dir).is_dir():
        raise FileNotFoundError(f"{tensorboard_dir}: no TensorBoard directory")
    accumulator = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: {event.step: event.value for event in accumulator.Scalars(tag)}
        for tag in accumulator.Tags().get("scalars", [])
    }


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------


def _metric(results: Mapping, policy: str, name: str) -> Optional[Mapping]:
    """A metric of compare()'s output as a dict with "score"; a bare number is accepted too."""
    value = results.get(policy, {}).get(name)
    if value is None or isinstance(value, Mapping):
        return value
    return {"score": value}


def _cell(metric: Optional[Mapping], interval: bool = False) -> str:
    if metric is None:
        return "n/a"
    text = "n/a" if metric.get("score") is None else f"{metric['score']:.1f}"
    if interval and metric.get("ci95"):
        low, high = metric["ci95"]
        text += f" [{low:.1f}, {high:.1f}]"
    if metric.get("stderr") is not None:
        text += f" ± {metric['stderr']:.1f}"
    if interval and metric.get("tie_rate") is not None:
        text += f", ties {metric['tie_rate']:.0f}%"
    if metric.get("missing"):
        text += f" ({metric['missing']} missing)"
    return text


COLUMN_LABELS = {
    "sip": "SIP (oracle roles)",
    "sip_learned": "SIP (learned roles)",
}
"""Table columns of the SIP runs compared with the baseline; ``results`` of the learned-roles
run are compare()'s output for it, stored under ``sip_learned`` by :func:`write_report`."""


def table_rows(results: Mapping, learned: Optional[Mapping] = None) -> list[list[str]]:
    """[header, safety, factuality, quality win rate (all prefixes, and those whose two
    continuations are safe)] rows of the baseline vs SIP (and SIP with learned roles, whose
    compare() output is ``learned``)."""
    unsafe = results.get("unsafe_set")
    safety_label = "Safety (% safe" + (f", {unsafe})" if unsafe else ")")
    runs = [results] + ([learned] if learned is not None else [])
    header = ["Metric", "Baseline", "SIP" if learned is None else COLUMN_LABELS["sip"]]
    if learned is not None:
        header.append(COLUMN_LABELS["sip_learned"])

    def row(label, policy_metric, baseline_cell=None, interval=False):
        cells = [baseline_cell or _cell(_metric(results, "baseline", policy_metric))]
        cells += [_cell(_metric(run, "sip", policy_metric), interval=interval) for run in runs]
        return [label, *cells]

    roles_rows = []
    if learned is not None:
        grader = results.get("judge") or "the comparison's judge"
        roles_rows = [
            ["Trained with (judge, rewriter)", "none (NLL)", "oracle, oracle", "learned, learned"],
            ["Graded by", grader, grader, learned.get("judge") or grader],
        ]
    ability = [_metric(run, "sip", "general_ability") for run in runs]
    ability_rows = []
    if any(ability):
        benchmark = next(a for a in ability if a).get("benchmark", "benchmark")
        label = f"General ability: {benchmark} accuracy (%, ± s.e.)"
        ability_rows = [row(label, "general_ability")]
    return [
        header,
        *roles_rows,
        row(safety_label, "safety"),
        row("Factuality (%)", "factuality"),
        *ability_rows,
        row("Quality win rate vs baseline (%, 95% CI)", "quality_win_rate", "50 (reference)", True),
        row(
            "Quality win rate, both safe (%, 95% CI)",
            "quality_win_rate_both_safe",
            "50 (reference)",
            True,
        ),
    ]


def format_table(results: Mapping, learned: Optional[Mapping] = None) -> str:
    """The results table as aligned plain text for the terminal."""
    rows = table_rows(results, learned)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


ABLATION_METRICS = ("safety", "factuality", "quality_win_rate")
MIN_SEEDS_FOR_ORDERING = 3
"""Fewer seeds claim no ordering: one seed's safety or factuality is a point, not an interval."""


def ablation_summary(runs: Mapping[str, Sequence[Mapping]]) -> dict:
    """Per variant and metric, over its seeds (``runs``: variant -> one compare() output per
    seed, each against that seed's baseline): the mean, and the interval that holds every seed's
    score and, for the win rate, every seed's 95% bootstrap interval (training noise and
    evaluation noise both). ``baseline`` is the NLL baseline's, over the same seeds."""

    def over(results: Sequence[Mapping], policy: str, name: str) -> Optional[dict]:
        metrics = [_metric(r, policy, name) or {} for r in results]
        scores = [m["score"] for m in metrics if m.get("score") is not None]
        if not scores:
            return None
        ends = [v for m in metrics for v in m.get("ci95") or ()] + scores
        return {
            "mean": round(sum(scores) / len(scores), 2),
            "interval": [round(min(ends), 2), round(max(ends), 2)],
            "seeds": scores,
        }

    first = next(iter(runs.values()), [])
    summary = {"baseline": {n: over(first, "baseline", n) for n in ABLATION_METRICS[:2]}}
    for variant, results in runs.items():
        summary[variant] = {n: over(results, "sip", n) for n in ABLATION_METRICS}
    return summary


def ablation_orderings(summary: Mapping[str, Mapping], metric: str) -> list[tuple[str, str]]:
    """(higher, lower) pairs of variants whose ``metric`` intervals (:func:`ablation_summary`)
    do not overlap: the only orderings the runs support."""
    entries = [(v, m[metric]) for v, m in summary.items() if m.get(metric)]
    return [
        (a, b)
        for a, high in entries
        for b, low in entries
        if a != b and high["interval"][0] > low["interval"][1]
    ]


def ablation_table(runs: Mapping[str, Sequence[Mapping]]) -> str:
    """A markdown table of several SIP variants over seeds (the paper's Table 6 analogue):
    safety, factuality and quality win rate per variant as the mean over seeds with the interval
    of :func:`ablation_summary`, then the orderings whose intervals separate."""
    summary = ablation_summary(runs)
    seeds = max((len(r) for r in runs.values()), default=0)

    def cell(entry: Optional[Mapping]) -> str:
        if entry is None:
            return "n/a"
        low, high = entry["interval"]
        return f"{entry['mean']:.1f} [{low:.1f}, {high:.1f}]"

    lines = [
        f"Mean over {seeds} seed(s) [the interval holding every seed's score and, for the win "
        "rate, every seed's 95% bootstrap interval].",
        "",
        "| Variant | Safety (%) | Factuality (%) | Quality win rate vs baseline (%) |",
        "|---|---|---|---|",
    ]
    for variant, metrics in summary.items():
        win = "50 (reference)" if variant == "baseline" else cell(metrics["quality_win_rate"])
        name = "baseline (NLL)" if variant == "baseline" else variant
        lines.append(
            f"| {name} | {cell(metrics['safety'])} | {cell(metrics['factuality'])} | {win} |"
        )
    lines.append("")
    if seeds < MIN_SEEDS_FOR_ORDERING:
        lines.append(f"No ordering is claimed from fewer than {MIN_SEEDS_FOR_ORDERING} seeds.")
    for metric in ABLATION_METRICS if seeds >= MIN_SEEDS_FOR_ORDERING else ():
        pairs = ablation_orderings(summary, metric)
        claims = ", ".join(f"{a} > {b}" for a, b in pairs) or "none (every interval overlaps)"
        lines.append(f"- {metric}: {claims}")
    return "\n".join(lines) + "\n"


def markdown_table(results: Mapping, learned: Optional[Mapping] = None) -> str:
    rows = table_rows(results, learned)
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join(["---"] * len(rows[0])) + "|")
    return "\n".join(lines)


def _meta_markdown(meta: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    blocks: list[str] = []
    for key, value in meta.items():
        if isinstance(value, Sequence) and not isinstance(value, str):
            blocks += ["", f"### {key}", "", "```", *map(str, value), "```"]
        elif isinstance(value, Mapping):
            blocks += ["", f"### {key}", "", "```json", json.dumps(value, indent=2), "```"]
        else:
            lines.append(f"- **{key}**: {value}")
    return lines + blocks


def report_markdown(
    results: Mapping,
    meta: Mapping[str, Any],
    learned: Optional[Mapping] = None,
    roles: Optional[Mapping] = None,
) -> str:
    counts = results.get("counts") or {}
    lines = [
        "# Self-Improving Pretraining: demo report",
        "",
        markdown_table(results, learned),
        "",
        "Safety: share of continuations of the unsafe prefixes the judge finds safe. "
        "Factuality: mean factuality score over every prefix. Win rate: SIP vs baseline on "
        "the same prefix, judged in both orders (win 1, tie 0.5, loss 0; disagreeing orders "
        "tie), with a 95% bootstrap interval; 'both safe': over the prefixes whose two "
        "continuations the judge finds safe.",
    ]
    ability = _metric(results, "sip", "general_ability")
    if ability:
        lines[-1] += (
            f" General ability: zero-shot accuracy on {ability.get('benchmark')} "
            f"({ability.get('documents')} questions; lm-evaluation-harness through "
            "megatron_sip.eval.benchmarks), with its standard error."
        )
    if counts:
        lines += ["", "Prefixes: " + ", ".join(f"{name} {n}" for name, n in counts.items())]
    if results.get("judge"):
        lines += [f"Graded by: `{results['judge']}` (every column)"]
    if learned is not None:
        lines += [
            "Trained with: the baseline with no judge (NLL); SIP (oracle roles) with the oracle "
            "judge and rewriter, the grader itself; SIP (learned roles) with the judge and "
            "rewriter trained below, which never saw the grader."
        ]
    if roles:
        lines += ["", "## Learned roles", "", *roles_markdown(roles)]
    lines += ["", "![comparison](comparison.png)", "", "## Training", ""]
    lines += ["![reward](reward.png)", "", "![safety](safety.png)", "", "## Run", ""]
    lines += _meta_markdown(meta)
    return "\n".join(lines) + "\n"


def pairwise_accuracy(agreement: Mapping) -> Optional[float]:
    """judge_agreement's pairwise accuracy over every corruption (it reports them apart)."""
    hits = total = 0
    for task, count in agreement.get("count", {}).items():
        if task.startswith("pairwise"):
            hits += agreement["accuracy"][task] * count
            total += count
    return round(hits / total, 4) if total else None


def judge_accuracy_summary(agreement: Mapping) -> dict:
    """{"safety", "pairwise", "factuality"} accuracies (fractions of 1) of judge_agreement's
    output."""
    accuracy = agreement.get("accuracy", {})
    return {
        "safety": accuracy.get("safety"),
        "pairwise": pairwise_accuracy(agreement),
        "factuality": accuracy.get("factuality"),
    }


def roles_summary(
    judge: Mapping[str, Mapping], rewriter: Mapping[str, Mapping], gold: Optional[Mapping] = None
) -> dict:
    """report.json's ``roles``: the learned judge's accuracy by task on held-out labels and the
    learned rewriter's rates after their full training (``judge["grpo"]``, ``rewriter["rl"]``:
    judge_agreement's and rewriter_quality's outputs), and the same after SFT alone; ``gold``:
    judge_agreement's output on pairs of policy continuations labelled by the gold judge
    (tools/gold_pairs.py), by the prose factor the worse side loses on."""
    final_judge, final_rewriter = judge["grpo"], rewriter["rl"]
    rates = ("copy_rate", "rewrite_safety", "original_safety", "false_fact_cleared_rate")
    return {
        "judge": {
            "accuracy": judge_accuracy_summary(final_judge),
            "accuracy_by_task": final_judge.get("accuracy", {}),
            "accuracy_after_sft": judge_accuracy_summary(judge["sft"]),
            "count": final_judge.get("count", {}),
            "appeals": final_judge.get("appeals", {}),
            "gold_agreement": _gold_agreement(gold) if gold else {},
        },
        "rewriter": {
            **{name: final_rewriter.get(name) for name in rates},
            "after_sft": {name: rewriter["sft"].get(name) for name in rates},
            "count": final_rewriter.get("count", {}),
            "errors": final_rewriter.get("errors", {}),
        },
    }


def _gold_agreement(gold: Mapping) -> dict:
    """{"pooled": fraction, "by_factor": {factor: fraction}, "count": {factor: n}}."""
    accuracy, count = gold.get("accuracy", {}), gold.get("count", {})
    by_factor = {task.split("/", 1)[1]: value for task, value in accuracy.items()}
    counts = {task.split("/", 1)[1]: count.get(task, 0) for task in accuracy}
    total = sum(counts.values())
    pooled = sum(by_factor[f] * counts[f] for f in by_factor) / total if total else None
    return {"pooled": pooled, "by_factor": by_factor, "count": counts}


def _fraction(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def roles_markdown(roles: Mapping) -> list[str]:
    """The learned roles' measurements (:func:`roles_summary`) as markdown lines."""
    judge, rewriter = roles["judge"], roles["rewriter"]
    lines = [
        "Judge: accuracy on held-out labelled tasks (judge_val.jsonl; fractions of 1).",
        "",
        "| Task | after SFT | after SFT + GRPO |",
        "|---|---|---|",
    ]
    for task in ("safety", "pairwise", "factuality"):
        lines.append(
            f"| {task} | {_fraction(judge['accuracy_after_sft'].get(task))} | "
            f"{_fraction(judge['accuracy'].get(task))} |"
        )
    for task, value in judge.get("accuracy_by_task", {}).items():
        if task.startswith("pairwise/"):
            lines.append(f"| {task} | | {_fraction(value)} |")
    gold = judge.get("gold_agreement") or {}
    if gold.get("by_factor"):
        lines += [
            "",
            "Judge against the gold judge on the policies' own continuations (pairs of the "
            "baseline's and SIP's continuations of one held-out prefix, both safe, labelled by "
            "the oracle; tools/gold_pairs.py), by what the worse one loses on: the rankings SIP "
            "needs from its judge.",
            "",
            "| Worse side loses on | pairs | agreement with the gold judge |",
            "|---|---|---|",
        ]
        for factor, value in gold["by_factor"].items():
            lines.append(f"| {factor} | {gold['count'].get(factor, 0)} | {_fraction(value)} |")
        lines.append(f"| all | {sum(gold['count'].values())} | {_fraction(gold['pooled'])} |")
    variants = judge.get("appeals", {}).get("variants", {})
    if variants:
        lines += [
            "",
            "Held-out appeals (families never trained on) in the judge's safety tasks:",
            "",
            "| Appeal (family/position/join) | accuracy | mean rise of P(safe) on unsafe | "
            "largest rise | unsafe flipped to safe |",
            "|---|---|---|---|---|",
        ]
        for name, row in variants.items():
            lines.append(
                f"| {name} | {_fraction(row['accuracy'])} | {row['mean_rise_on_unsafe']:+.3f} | "
                f"{row['max_rise']:+.3f} | {row['unsafe_flipped_to_safe']} of {row['unsafe']} |"
            )
    lines += [
        "",
        "Rewriter: held-out triples (rewriter_val.jsonl), graded by the oracle.",
        "",
        "| Rate | after SFT | after SFT + RL |",
        "|---|---|---|",
    ]
    for name, label in (
        ("copy_rate", "copy rate on safe contexts"),
        ("rewrite_safety", "safe rewrites of unsafe contexts"),
        ("original_safety", "safe originals of unsafe contexts (a copy's score)"),
        ("false_fact_cleared_rate", "false facts cleared (corrected or dropped)"),
    ):
        lines.append(
            f"| {label} | {_fraction(rewriter['after_sft'].get(name))} | "
            f"{_fraction(rewriter.get(name))} |"
        )
    return lines


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _figure().close(figure)
    write_atomically(path, buffer.getvalue())


def plot_curves(path: Path, curves: Curves, tags: Sequence[str], title: str, ylabel: str) -> None:
    """One line per (run, tag) that was logged; a note instead when none was."""
    plt = _figure()
    figure, axis = plt.subplots(figsize=(7, 4))
    plotted = 0
    for run, scalars in curves.items():
        for tag in tags:
            points = sorted((scalars.get(tag) or {}).items())
            if not points:
                continue
            steps, values = zip(*points)
            label = f"{run}: {tag}" if len(curves) > 1 else tag
            axis.plot(steps, values, marker="." if len(points) < 30 else None, label=label)
            plotted += 1
    if plotted:
        axis.legend(fontsize=8)
    else:
        axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes)
    axis.set(title=title, xlabel="iteration", ylabel=ylabel)
    axis.grid(alpha=0.3)
    _save(figure, path)


def safety_tags(curves: Curves) -> list[str]:
    """sip/safety/rollout-mean first, then every other sip/safety/* tag of any run."""
    found = sorted(
        {tag for scalars in curves.values() for tag in scalars if tag.startswith(SAFETY_PREFIX)}
    )
    return [SAFETY_TAG] + [tag for tag in found if tag != SAFETY_TAG]


def plot_comparison(path: Path, results: Mapping) -> None:
    plt = _figure()
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 4), gridspec_kw={"width_ratios": [2, 1]})
    names = [("safety", "safety"), ("factuality", "factuality")]
    width = 0.38
    for offset, (policy, label) in zip(
        (-width / 2, width / 2), (("baseline", "baseline"), ("sip", "SIP"))
    ):
        scores = [(_metric(results, policy, key) or {}).get("score") for key, _ in names]
        positions = [i + offset for i in range(len(names))]
        bars = left.bar(positions, [s or 0.0 for s in scores], width, label=label)
        for bar, score in zip(bars, scores):
            text = "n/a" if score is None else f"{score:.0f}"
            left.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)  # fmt: skip
    left.set_xticks(range(len(names)), [label for _, label in names])
    left.set(ylim=(0, 105), ylabel="%", title="baseline vs SIP")
    left.legend(fontsize=8)

    win = _metric(results, "sip", "quality_win_rate") or {}
    score, interval = win.get("score"), win.get("ci95")
    error = None
    if score is not None and interval:
        error = [[score - interval[0]], [interval[1] - score]]
    right.bar([0], [score or 0.0], 0.5, yerr=error, capsize=6, color="tab:green")
    right.axhline(50, color="gray", linestyle="--", linewidth=1)
    right.annotate("n/a" if score is None else f"{score:.0f}", (0, score or 0.0),
                   ha="center", va="bottom", fontsize=8, xytext=(12, 2),
                   textcoords="offset points")  # fmt: skip
    right.set_xticks([0], ["SIP vs baseline"])
    right.set(xlim=(-0.75, 0.75), ylim=(0, 105), title="quality win rate")
    for axis in (left, right):
        axis.grid(axis="y", alpha=0.3)
    _save(figure, path)


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------


HEADLINE_METRICS = (
    "safety", "factuality", "general_ability", "quality_win_rate", "quality_win_rate_both_safe"
)  # fmt: skip


def headline(results: Mapping, learned: Optional[Mapping] = None) -> dict:
    """The report's top level: for ``baseline`` and ``sip`` (and ``sip_learned``, SIP with the
    learned roles, whose compare() output is ``learned``), ``safety`` and ``factuality`` in
    percent, ``general_ability`` (a zero-shot benchmark's accuracy, where measured), and SIP's
    ``quality_win_rate`` over the baseline (and ``quality_win_rate_both_safe``,
    on the prefixes where both continuations are safe) with their 95% bootstrap intervals."""
    out: dict = {}
    runs = [("baseline", results, "baseline"), ("sip", results, "sip")]
    if learned is not None:
        runs.append(("sip_learned", learned, "sip"))
    for key, run, policy in runs:
        entry = {}
        for name in HEADLINE_METRICS:
            metric = _metric(run, policy, name)
            if metric is not None:
                entry[name] = metric.get("score")
                if "ci95" in metric:
                    entry[f"{name}_ci95"] = metric["ci95"]
                if metric.get("stderr") is not None:
                    entry[f"{name}_stderr"] = metric["stderr"]
        out[key] = entry
    return out


def write_report(
    out_dir: str | os.PathLike,
    results: Mapping,
    curves: Curves,
    meta: Mapping,
    learned: Optional[Mapping] = None,
    roles: Optional[Mapping] = None,
) -> None:
    """report.json, report.md, reward.png, safety.png and comparison.png under ``out_dir``.
    ``results`` is compare()'s output, ``curves`` {run name: read_scalars(...)}; tags a run did
    not log are left out of its plots. ``learned`` is compare()'s output for SIP with learned
    roles and ``roles`` their measurements (:func:`roles_summary`), both optional."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(out / "reward.png", curves, REWARD_TAGS, "SIP rewards", "judge reward")
    plot_curves(out / "safety.png", curves, safety_tags(curves), "SIP safety", "safety score")
    plot_comparison(out / "comparison.png", results)
    document = {**headline(results, learned), "details": results}
    if learned is not None:
        document["details_learned"] = learned
    if roles is not None:
        document["roles"] = roles
    document["meta"] = meta
    write_atomically(out / "report.json", json.dumps(document, indent=2, default=str) + "\n")
    write_atomically(out / "report.md", report_markdown(results, meta, learned, roles))
