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
    if interval and metric.get("tie_rate") is not None:
        text += f", ties {metric['tie_rate']:.0f}%"
    if metric.get("missing"):
        text += f" ({metric['missing']} missing)"
    return text


def table_rows(results: Mapping) -> list[list[str]]:
    """[header, safety, factuality, quality win rate (all prefixes, and those whose two
    continuations are safe)] rows of baseline vs SIP."""
    unsafe = results.get("unsafe_set")
    safety_label = "Safety (% safe" + (f", {unsafe})" if unsafe else ")")
    return [
        ["Metric", "Baseline", "SIP"],
        [
            safety_label,
            _cell(_metric(results, "baseline", "safety")),
            _cell(_metric(results, "sip", "safety")),
        ],
        [
            "Factuality (%)",
            _cell(_metric(results, "baseline", "factuality")),
            _cell(_metric(results, "sip", "factuality")),
        ],
        [
            "Quality win rate vs baseline (%, 95% CI)",
            "50 (reference)",
            _cell(_metric(results, "sip", "quality_win_rate"), interval=True),
        ],
        [
            "Quality win rate, both safe (%, 95% CI)",
            "50 (reference)",
            _cell(_metric(results, "sip", "quality_win_rate_both_safe"), interval=True),
        ],
    ]


def format_table(results: Mapping) -> str:
    """The results table as aligned plain text for the terminal."""
    rows = table_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def ablation_table(runs: Mapping[str, Mapping]) -> str:
    """A markdown table of several SIP variants, each compared with the same baseline
    (the paper's Table 6 analogue): safety, factuality and quality win rate per variant."""
    lines = [
        "| Variant | Safety (%) | Factuality (%) | Quality win rate vs baseline (%, 95% CI) |",
        "|---|---|---|---|",
    ]
    baseline = next(iter(runs.values()), {})
    lines.append(
        f"| baseline (NLL) | {_cell(_metric(baseline, 'baseline', 'safety'))} | "
        f"{_cell(_metric(baseline, 'baseline', 'factuality'))} | 50 (reference) |"
    )
    for name, results in runs.items():
        lines.append(
            f"| {name} | {_cell(_metric(results, 'sip', 'safety'))} | "
            f"{_cell(_metric(results, 'sip', 'factuality'))} | "
            f"{_cell(_metric(results, 'sip', 'quality_win_rate'), interval=True)} |"
        )
    return "\n".join(lines) + "\n"


def markdown_table(results: Mapping) -> str:
    rows = table_rows(results)
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


def report_markdown(results: Mapping, meta: Mapping[str, Any]) -> str:
    counts = results.get("counts") or {}
    lines = [
        "# Self-Improving Pretraining: demo report",
        "",
        markdown_table(results),
        "",
        "Safety: share of continuations of the unsafe prefixes the judge finds safe. "
        "Factuality: mean factuality score over every prefix. Win rate: SIP vs baseline on "
        "the same prefix, judged in both orders (win 1, tie 0.5, loss 0; disagreeing orders "
        "tie), with a 95% bootstrap interval.",
    ]
    if counts:
        lines += ["", "Prefixes: " + ", ".join(f"{name} {n}" for name, n in counts.items())]
    if results.get("judge"):
        lines += [f"Judge: `{results['judge']}`"]
    lines += ["", "![comparison](comparison.png)", "", "## Training", ""]
    lines += ["![reward](reward.png)", "", "![safety](safety.png)", "", "## Run", ""]
    lines += _meta_markdown(meta)
    return "\n".join(lines) + "\n"


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


def headline(results: Mapping) -> dict:
    """The report's top level: for ``baseline`` and ``sip``, ``safety`` and ``factuality`` in
    percent, and SIP's ``quality_win_rate`` over the baseline (and ``quality_win_rate_both_safe``,
    on the prefixes where both continuations are safe) with their 95% bootstrap intervals."""
    out: dict = {}
    for policy in ("baseline", "sip"):
        entry = {}
        for name in ("safety", "factuality", "quality_win_rate", "quality_win_rate_both_safe"):
            metric = _metric(results, policy, name)
            if metric is not None:
                entry[name] = metric.get("score")
                if "ci95" in metric:
                    entry[f"{name}_ci95"] = metric["ci95"]
        out[policy] = entry
    return out


def write_report(
    out_dir: str | os.PathLike, results: Mapping, curves: Curves, meta: Mapping
) -> None:
    """report.json, report.md, reward.png, safety.png and comparison.png under ``out_dir``.
    ``results`` is compare()'s output, ``curves`` {run name: read_scalars(...)}; tags a run did
    not log are left out of its plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(out / "reward.png", curves, REWARD_TAGS, "SIP rewards", "judge reward")
    plot_curves(out / "safety.png", curves, safety_tags(curves), "SIP safety", "safety score")
    plot_comparison(out / "comparison.png", results)
    document = {**headline(results), "details": results, "meta": meta}
    write_atomically(out / "report.json", json.dumps(document, indent=2, default=str) + "\n")
    write_atomically(out / "report.md", report_markdown(results, meta))
