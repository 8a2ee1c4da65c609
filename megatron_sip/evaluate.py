"""The paper's evaluation of a policy checkpoint against a baseline, in one command.

    torchrun --nproc-per-node 2 -m megatron_sip.evaluate \\
        --load runs/demo/sip --baseline-load runs/demo/baseline \\
        --prefixes data/demo/eval_unsafe_prefixes.jsonl data/demo/eval_safe_prefixes.jsonl \\
        --unsafe-set eval_unsafe_prefixes --judge-backend oracle --judge-oracle-data data/demo \\
        --claim-knowledge data/demo --output-dir runs/demo/evaluation

Both checkpoints continue every held-out prefix (any TP/PP under torchrun, the same sampler seed,
``megatron_sip.eval.continuations``'s flags); then the judge scores them (METHOD.md,
"Evaluation"):

- pairwise **quality** and **coherence** win rates of the candidate over the baseline, judged in
  both orders (a win needs both orders, a disagreement is a tie), with tie rate, position
  consistency, missing verdicts and a 95% bootstrap interval; quality also where both
  continuations are safe;
- **safety**: % of the unsafe set's continuations judged safe; the judge's **factuality** score;
- **claim-level factuality** (``megatron_sip.eval.claims``): the share of atomic claims supported
  by ``--claim-knowledge``: the demo's knowledge base (a directory with ``oracle.json``) or a
  JSONL of passages, retrieved with BM25 and judged by the judge.

Writes ``evaluation.json``, ``evaluation.md`` and ``evaluation.png`` under ``--output-dir``, with
the continuations (``candidate.jsonl``, ``baseline.jsonl``). A judge that cannot judge (its
calibration self-check fails, or it has no coherence verdict) stops the run before anything is
generated; ``--eval-skip coherence`` or ``claims`` leaves a metric out, and the report says so.

With ``--<benchmark>-data`` files (``megatron_sip.eval.benchmarks``: BoolQ, PIQA, HellaSwag,
ARC-Easy/Challenge, OpenBookQA, SIQA, MMLU, the demo's Factbook set), both checkpoints also run
those zero-shot multiple-choice benchmarks through lm-evaluation-harness, and the report gains
their accuracies.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from megatron_sip.arguments import LaunchConfig, parse_args
from megatron_sip.errors import ConfigError, exits_on_bad_input, require_positive
from megatron_sip.eval.benchmarks import BenchmarkConfig, checked_files, run_benchmarks
from megatron_sip.eval.compare import compare, pair_outcomes, win_rate_summary
from megatron_sip.eval.continuations import (
    GenerationConfig,
    check_prefix_files,
    continuation_lines,
    continuation_rows,
    continue_prefixes,
    write_atomically,
)
from megatron_sip.inference.sampling import SamplingConfig
from megatron_sip.initialize import destroy_distributed, initialize_distributed
from megatron_sip.log import print_rank_0, setup_logging
from megatron_sip.roles.config import JudgeConfig, RoleContext, build_judge
from megatron_sip.roles.self_check import check_judge

SKIPPABLE = ("coherence", "claims")


@dataclasses.dataclass
class EvaluateConfig:
    """Which checkpoints are compared on which prefixes, and where the report goes."""

    load: Optional[str] = None
    """Checkpoint of the policy under evaluation (SIP training, pretraining, an HF import)."""

    baseline_load: Optional[str] = None
    """Checkpoint of the baseline it is compared with (e.g. NLL continual pretraining)."""

    prefixes: Optional[list[str]] = None
    """Held-out prefix files (jsonl rows with a "prefix" string); each file's stem names its
    set."""

    unsafe_set: str = "eval_unsafe_prefixes"
    """Set (prefix file stem) whose continuations the safety score is computed on."""

    output_dir: Optional[str] = None
    """Directory of evaluation.json, evaluation.md, evaluation.png and the continuations."""

    claim_knowledge: Optional[str] = None
    """Knowledge source of claim-level factuality: a directory with the demo's oracle.json
    (its knowledge base), or a jsonl of passages ({"text", "title"?, "id"?}) retrieved with
    BM25 and judged by the judge."""

    claim_top_k: int = 3
    """Passages retrieved per claim (with a passages file)."""

    claim_min_words: int = 3
    """Words a clause needs to count as a claim."""

    eval_skip: list[str] = dataclasses.field(default_factory=list)
    """Metrics left out: coherence (for a judge without a coherence verdict), claims."""

    bootstrap: int = 1000
    """Bootstrap resamples of the win-rate intervals."""

    def __post_init__(self):
        for flag, value in (
            ("--load", self.load),
            ("--baseline-load", self.baseline_load),
            ("--prefixes", self.prefixes),
            ("--output-dir", self.output_dir),
        ):
            if not value:
                raise ConfigError(flag, "required")
        check_prefix_files(self.prefixes)
        unknown = sorted(set(self.eval_skip) - set(SKIPPABLE))
        if unknown:
            raise ConfigError("--eval-skip", f"unknown {unknown}; skippable: {list(SKIPPABLE)}")
        if "claims" not in self.eval_skip and not self.claim_knowledge:
            raise ConfigError(
                "--claim-knowledge",
                "required for claim-level factuality (a knowledge-base directory or a passages "
                "jsonl); or --eval-skip claims",
            )
        if self.claim_knowledge and not os.path.exists(self.claim_knowledge):
            raise ConfigError("--claim-knowledge", f"{self.claim_knowledge} does not exist")
        require_positive("--claim-top-k", self.claim_top_k)
        require_positive("--claim-min-words", self.claim_min_words)
        require_positive("--bootstrap", self.bootstrap)


@dataclasses.dataclass
class EvaluateJobConfig(LaunchConfig):
    """Every setting of ``python -m megatron_sip.evaluate``."""

    sampling: SamplingConfig
    generation: GenerationConfig
    judge: JudgeConfig
    benchmarks: BenchmarkConfig
    evaluate: EvaluateConfig


def claim_source(config: EvaluateConfig, judge):
    """The knowledge source ``--claim-knowledge`` names."""
    from megatron_sip.eval.claims import KnowledgeBaseSource, PassageSource

    path = Path(config.claim_knowledge)
    if path.is_dir():
        if not (path / "oracle.json").is_file():
            raise ConfigError("--claim-knowledge", f"{path}: a directory without oracle.json")
        return KnowledgeBaseSource(str(path))
    try:
        return PassageSource(str(path), judge, config.claim_top_k)
    except ValueError as error:
        raise ConfigError("--claim-knowledge", str(error)) from None


def score(judge, config: EvaluateConfig, baseline_rows: list, candidate_rows: list) -> dict:
    """Every metric of the report (see the module), from the judge and the knowledge source."""
    from megatron_sip.eval.claims import claim_factuality

    result = compare(
        judge,
        baseline_rows,
        candidate_rows,
        config.unsafe_set,
        bootstrap=config.bootstrap,
    )
    prefixes = [row["prefix"] for row in baseline_rows]
    baseline = [row["continuation"] for row in baseline_rows]
    candidate = [row["continuation"] for row in candidate_rows]
    if "coherence" not in config.eval_skip:
        outcomes = pair_outcomes(
            judge.prefer_coherence(prefixes, candidate, baseline),
            judge.prefer_coherence(prefixes, baseline, candidate),
        )
        result["sip"]["coherence_win_rate"] = win_rate_summary(outcomes, bootstrap=config.bootstrap)
    if "claims" not in config.eval_skip:
        source = claim_source(config, judge)
        for name, texts in (("baseline", baseline), ("sip", candidate)):
            result[name]["claim_factuality"] = claim_factuality(
                prefixes, texts, source, config.claim_min_words
            )
        result["claim_knowledge"] = config.claim_knowledge
    result["skipped"] = sorted(config.eval_skip)
    return result


def benchmark_checkpoint(load: str, files: dict, configs, context, directory: Path) -> dict:
    """lm-eval zero-shot results of the checkpoint under ``load`` on ``files`` (collective
    over the world; every rank returns them)."""
    from megatron_sip.eval.lm_eval_model import MegatronSIPLM

    lm = MegatronSIPLM(
        load,
        configs.parallel.tensor_model_parallel_size,
        configs.parallel.pipeline_model_parallel_size,
        batch_size=configs.benchmarks.benchmark_batch_size,
        model_args=configs.generation.eval_model_args,
        context=context,
    )
    try:
        return run_benchmarks(lm, files, directory, configs.benchmarks.benchmark_limit)
    finally:
        lm.close()


def _check_judge_can_judge(judge, config: EvaluateConfig, judge_config, group) -> None:
    """Before anything is generated: the calibration self-check, and a coherence verdict."""
    check_judge(judge, judge_config, group)
    if "coherence" not in config.eval_skip:
        try:
            judge.prefer_coherence(["A text."], ["It goes on."], ["It goes on too."])
        except NotImplementedError as error:
            raise ConfigError("--judge-prompt-dir", f"{error}; or --eval-skip coherence") from None


def markdown(report: dict) -> str:
    """The report as a Markdown table (percent; intervals in brackets)."""

    def cell(metric: Optional[dict]) -> str:
        if not metric or metric.get("score") is None:
            return "n/a"
        text = f"{metric['score']:.1f}"
        if metric.get("ci95"):
            text += f" [{metric['ci95'][0]:.1f}, {metric['ci95'][1]:.1f}]"
        return text

    sip, baseline = report["sip"], report["baseline"]
    lines = [
        "# Evaluation",
        "",
        f"Candidate `{report['checkpoints']['candidate']}` against baseline "
        f"`{report['checkpoints']['baseline']}`, judged by `{report['judge']}`.",
        "",
        "| Metric (%) | Baseline | Candidate |",
        "|---|---|---|",
        f"| Quality win rate vs baseline | 50 (reference) | {cell(sip['quality_win_rate'])} |",
        "| Quality win rate, both continuations safe | 50 (reference) | "
        f"{cell(sip['quality_win_rate_both_safe'])} |",
    ]
    if "coherence_win_rate" in sip:
        coherence = cell(sip["coherence_win_rate"])
        lines.append(f"| Coherence win rate vs baseline | 50 (reference) | {coherence} |")
    lines += [
        f"| Safety ({report['unsafe_set']}) | {cell(baseline['safety'])} | {cell(sip['safety'])} |",
        f"| Factuality (judge) | {cell(baseline['factuality'])} | {cell(sip['factuality'])} |",
    ]
    if "claim_factuality" in sip:
        lines.append(
            "| Supported claims (claim-level factuality) | "
            f"{cell(baseline['claim_factuality'])} | {cell(sip['claim_factuality'])} |"
        )
    lines += benchmark_lines(report.get("benchmarks", {}))
    if report["skipped"]:
        lines += ["", f"Skipped (`--eval-skip`): {', '.join(report['skipped'])}."]
    quality = sip["quality_win_rate"]
    lines += [
        "",
        f"Quality: {quality['wins']} wins, {quality['ties']} ties, {quality['losses']} losses of "
        f"{quality['count']} prefixes ({quality['missing']} missing verdicts; position "
        f"consistency {quality['position_consistency']}%).",
    ]
    if "claim_factuality" in sip:
        claims = sip["claim_factuality"]
        lines.append(
            f"Claims (candidate): {claims['claims']} claims, {claims['supported']} supported, "
            f"{claims['unsupported']} unsupported (knowledge: `{report['claim_knowledge']}`)."
        )
    return "\n".join(lines) + "\n"


def benchmark_lines(benchmarks: dict) -> list[str]:
    """Zero-shot accuracies of both checkpoints (standard errors in brackets)."""
    if not benchmarks:
        return []

    def cell(entry: dict, metric: str) -> str:
        if metric not in entry:
            return "n/a"
        stderr = entry.get(f"{metric}_stderr")
        return f"{entry[metric]:.1f}" + (f" (± {stderr:.1f})" if stderr is not None else "")

    lines = [
        "",
        "| Zero-shot benchmark (accuracy %, ± standard error) | Documents | Baseline | Candidate |",
        "|---|---|---|---|",
    ]
    for name, sides in benchmarks.items():
        for metric, label in (("acc", "acc"), ("acc_norm", "acc_norm")):
            if metric in sides["sip"]:
                limited = " (limited)" if sides["sip"]["limited"] else ""
                lines.append(
                    f"| {name} {label}{limited} | {sides['sip']['documents']} | "
                    f"{cell(sides['baseline'], metric)} | {cell(sides['sip'], metric)} |"
                )
    return lines


def plot(report: dict, path: Path) -> None:
    """Win rates with their intervals, and safety and claim factuality of both policies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sip, baseline = report["sip"], report["baseline"]
    rates = {
        "quality": sip["quality_win_rate"],
        "quality, both safe": sip["quality_win_rate_both_safe"],
        "coherence": sip.get("coherence_win_rate"),
    }
    rates = {k: v for k, v in rates.items() if v and v.get("score") is not None}
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(rates)
    scores = [rates[n]["score"] for n in names]
    errors = [[s - rates[n]["ci95"][0] for n, s in zip(names, scores)],
              [rates[n]["ci95"][1] - s for n, s in zip(names, scores)]]  # fmt: skip
    left.bar(names, scores, yerr=errors, capsize=4, color="tab:blue")
    left.axhline(50, color="grey", linestyle="--", linewidth=1)
    left.set_ylim(0, 100)
    left.set_title("Candidate win rate vs baseline (%)")
    metrics = [("safety", "safety"), ("claim_factuality", "supported claims")]
    bars = [
        (label, baseline[key]["score"], sip[key]["score"])
        for key, label in metrics
        if key in sip and sip[key]["score"] is not None
    ]
    bars += [
        (f"{name} acc", sides["baseline"]["acc"], sides["sip"]["acc"])
        for name, sides in report.get("benchmarks", {}).items()
    ]
    labels = [label for label, _, _ in bars]
    width = 0.38
    positions = range(len(bars))
    right.bar([p - width / 2 for p in positions], [b for _, b, _ in bars], width,
              label="baseline", color="tab:grey")  # fmt: skip
    right.bar([p + width / 2 for p in positions], [c for _, _, c in bars], width,
              label="candidate", color="tab:green")  # fmt: skip
    right.set_xticks(list(positions), labels)
    right.set_ylim(0, 100)
    right.set_title("Baseline and candidate (%)")
    right.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(report: dict, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(output_dir / "evaluation.json", json.dumps(report, indent=2) + "\n")
    write_atomically(output_dir / "evaluation.md", markdown(report))
    plot(report, output_dir / "evaluation.png")


@exits_on_bad_input
def main(argv=None) -> None:
    from tqdm import tqdm

    configs = parse_args(argv, EvaluateJobConfig, description=__doc__)
    config: EvaluateConfig = configs.evaluate
    rows = continuation_rows(config.prefixes)  # bad input files fail before any model loads
    benchmark_files = checked_files(configs.benchmarks)
    if config.unsafe_set not in {row["set"] for row in rows}:
        raise ConfigError(
            "--unsafe-set", f"{config.unsafe_set!r} is not the stem of a --prefixes file"
        )
    context = initialize_distributed(
        configs.parallel, configs.platform.device, configs.generation.seed
    )
    setup_logging()
    colocated = configs.judge.judge_backend == "megatron"
    judge = None
    if colocated or context.rank == 0:
        roles = RoleContext(configs.parallel, context.pg_collection) if colocated else None
        judge = build_judge(configs.judge, roles)
        _check_judge_can_judge(
            judge, config, configs.judge, context.pg_collection.mp if colocated else None
        )
    output_dir = Path(config.output_dir)
    total = 3 + 2 * bool(benchmark_files)
    steps = tqdm(total=total, desc="evaluate", unit="step", disable=context.rank != 0)
    texts, benchmarks = {}, {}
    for name, load in (("candidate", config.load), ("baseline", config.baseline_load)):
        steps.set_postfix_str(f"continuations of {name}")
        texts[name] = continue_prefixes(
            load, rows, configs.generation, configs.sampling, configs.parallel, context
        )
        steps.update()
        if benchmark_files:
            steps.set_postfix_str(f"benchmarks of {name}")
            benchmarks[name] = benchmark_checkpoint(
                load, benchmark_files, configs, context, output_dir / "benchmark_tasks"
            )
            steps.update()
    candidate_rows = [{**row, "continuation": t} for row, t in zip(rows, texts["candidate"])]
    baseline_rows = [{**row, "continuation": t} for row, t in zip(rows, texts["baseline"])]
    if context.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        for name, column in texts.items():
            write_atomically(output_dir / f"{name}.jsonl", continuation_lines(rows, column))
    if not colocated:
        destroy_distributed()  # a judge of its own (oracle, server) is scored on rank 0 alone
    if judge is not None:
        steps.set_postfix_str("judging")
        try:
            report = score(judge, config, baseline_rows, candidate_rows)
        finally:
            judge.close()
        steps.update()
        steps.close()
        if context.rank == 0:
            report["checkpoints"] = {"candidate": config.load, "baseline": config.baseline_load}
            report["benchmarks"] = {
                name: {"baseline": benchmarks["baseline"][name], "sip": result}
                for name, result in benchmarks.get("candidate", {}).items()
            }
            report["generation"] = {
                **dataclasses.asdict(configs.generation),
                **dataclasses.asdict(configs.sampling),
            }
            write_report(report, output_dir)
            print_rank_0(markdown(report))
            print_rank_0(f"wrote {output_dir / 'evaluation.json'}, evaluation.md, evaluation.png")
    if colocated:
        destroy_distributed()


if __name__ == "__main__":
    main()
