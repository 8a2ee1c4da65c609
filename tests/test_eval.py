"""Evaluation: continuations of held-out prefixes, judge-based metrics, the demo report."""

from __future__ import annotations

import json
import re

import pytest

from megatron_sip.eval.compare import compare, factuality, safety, win_rate
from megatron_sip.eval.continuations import load_continuations, load_prefixes
from megatron_sip.eval.judge_agreement import first_per_task
from megatron_sip.eval.report import (
    ablation_orderings,
    ablation_summary,
    ablation_table,
    format_table,
    headline,
    read_scalars,
    roles_summary,
    table_rows,
    write_report,
)
from megatron_sip.eval.rewriter_quality import evenly_spaced, rewriter_quality
from megatron_sip.roles.base import Judge, Rewriter
from megatron_sip.training.rewriter_data import RewriteTriple

from . import workers
from .distributed import run_ranks


class FakeJudge(Judge):
    """Scores looked up by text: ``prefs[(first, second)]``, ``safe[text]``, ``facts[text]``;
    absent keys are missing (None)."""

    def __init__(self, prefs=None, safe=None, facts=None):
        self.prefs, self.safe, self.facts = prefs or {}, safe or {}, facts or {}

    def prefer(self, prefixes, firsts, seconds):
        return [self.prefs.get((a, b)) for a, b in zip(firsts, seconds)]

    def safety(self, prefixes, texts):
        return [self.safe.get(t) for t in texts]

    def factuality(self, prefixes, texts):
        return [self.facts.get(t) for t in texts]


# --------------------------------------------------------------------------------------------
# prefix files
# --------------------------------------------------------------------------------------------


def test_load_prefixes_keeps_fields_and_names_bad_lines(tmp_path):
    good = tmp_path / "eval_prefixes.jsonl"
    good.write_text('{"id": "a", "prefix": "Once"}\n\n{"prefix": "Twice", "topic": "x"}\n')
    assert load_prefixes(good) == [{"id": "a", "prefix": "Once"}, {"prefix": "Twice", "topic": "x"}]
    for body, line, message in (
        ('{"prefix": "ok"}\n{"prefix": "cut', 2, "invalid JSON"),
        ('{"prefix": "ok"}\n{"prefix": "ok"}\n{"id": 3}\n', 3, 'no "prefix"'),
        ('{"prefix": 7}\n', 1, "non-string"),
        ('["prefix"]\n', 1, "JSON object"),
    ):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body)
        with pytest.raises(ValueError, match=re.escape(f"{bad}:{line}: ") + f".*{message}"):
            load_prefixes(bad)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"set": "s", "index": "0", "prefix": "p", "continuation": "c"}\n')
    with pytest.raises(ValueError, match=re.escape(f'{rows}:1: "index" must be a int')):
        load_continuations(rows)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def test_win_rate_needs_both_orders_to_agree():
    prefixes = ["p"] * 4
    cands, bases = [f"c{i}" for i in range(4)], [f"b{i}" for i in range(4)]
    wins = {(c, b): 0.9 for c, b in zip(cands, bases)} | {(b, c): 0.2 for c, b in zip(cands, bases)}
    result = win_rate(FakeJudge(wins), prefixes, cands, bases)
    assert result["score"] == 100.0 and result["ci95"] == [100.0, 100.0]
    assert (result["wins"], result["ties"], result["tie_rate"], result["missing"]) == (4, 0, 0.0, 0)
    assert result["position_consistency"] == 100.0

    # The judge prefers whichever comes first: the orders disagree, every pair is a tie.
    biased = {(c, b): 0.8 for c, b in zip(cands, bases)} | {
        (b, c): 0.8 for c, b in zip(cands, bases)
    }
    result = win_rate(FakeJudge(biased), prefixes, cands, bases)
    assert result["score"] == 50.0 and result["tie_rate"] == 100.0 and result["ties"] == 4
    assert result["position_consistency"] == 0.0

    # win, loss, tie, missing (one order absent): the missing pair is left out.
    mixed = {
        ("c0", "b0"): 0.9, ("b0", "c0"): 0.1,
        ("c1", "b1"): 0.1, ("b1", "c1"): 0.9,
        ("c2", "b2"): 0.9, ("b2", "c2"): 0.6,
        ("c3", "b3"): 0.9,
    }  # fmt: skip
    result = win_rate(FakeJudge(mixed), prefixes, cands, bases, bootstrap=500, seed=1)
    assert (result["wins"], result["losses"], result["ties"]) == (1, 1, 1)
    assert result["count"] == 3 and result["missing"] == 1 and result["score"] == 50.0
    assert result["position_consistency"] == pytest.approx(66.67, abs=0.01)
    low, high = result["ci95"]
    assert 0.0 <= low <= result["score"] <= high <= 100.0 and low < high
    assert win_rate(FakeJudge(mixed), prefixes, cands, bases, bootstrap=500, seed=1) == result
    nothing = win_rate(FakeJudge(), prefixes, cands, bases)
    assert nothing["score"] is None and nothing["ci95"] is None and nothing["missing"] == 4


def test_safety_and_factuality_count_missing_scores():
    rows = [{"prefix": "p", "continuation": t} for t in ("a", "b", "c", "d")]
    judge = FakeJudge(safe={"a": 1.0, "b": 0.5, "c": 0.2}, facts={"a": 1.0, "b": 0.5})
    assert safety(judge, rows) == {"score": 66.6667, "count": 3, "missing": 1}
    assert factuality(judge, rows) == {"score": 75.0, "count": 2, "missing": 2}
    assert safety(FakeJudge(), rows) == {"score": None, "count": 0, "missing": 4}


def _rows(texts, sets=("unsafe", "unsafe", "clean")):
    return [
        {"set": s, "index": i, "prefix": f"{s} prefix {i}", "continuation": t}
        for i, (s, t) in enumerate(zip(sets, texts))
    ]


def test_compare_headline_and_per_set_numbers():
    base, sip = _rows(["bad", "bad2", "meh"]), _rows(["good", "good2", "fine"])
    prefs = {}
    for b, c in zip(base, sip):
        prefs[(c["continuation"], b["continuation"])] = 0.9
        prefs[(b["continuation"], c["continuation"])] = 0.2
    judge = FakeJudge(
        prefs,
        safe={"bad": 0.0, "bad2": 1.0, "meh": 0.0, "good": 1.0, "good2": 1.0, "fine": 1.0},
        facts={"bad": 0.0, "bad2": 0.0, "meh": 1.0, "good": 1.0, "good2": 1.0},
    )
    result = compare(judge, base, list(reversed(sip)), "unsafe")  # matched by (set, index)
    assert result["baseline"]["safety"]["score"] == 50.0  # the unsafe set only
    assert result["sip"]["safety"] == {"score": 100.0, "count": 2, "missing": 0}
    assert result["baseline"]["factuality"]["score"] == pytest.approx(100 / 3, abs=1e-3)
    assert result["sip"]["factuality"] == {"score": 100.0, "count": 2, "missing": 1}
    assert result["sip"]["quality_win_rate"]["score"] == 100.0
    assert result["sip"]["quality_win_rate"]["count"] == 3  # both sets
    assert result["sets"]["clean"]["baseline"]["safety"]["score"] == 0.0
    assert result["counts"] == {"unsafe": 2, "clean": 1}
    # Only the second prefix has two safe continuations (bad2, good2): the both-safe win rate.
    both = result["sip"]["quality_win_rate_both_safe"]
    assert (both["score"], both["count"], both["missing"]) == (100.0, 1, 0)
    table = format_table(result)
    assert "100.0 [100.0, 100.0]" in table and table.splitlines()[0].startswith("Metric")
    assert "both safe" in table
    # SIP loses the one both-safe pair: it wins on quality only where it is also safer.
    prefs[("good2", "bad2")], prefs[("bad2", "good2")] = 0.2, 0.9
    flipped = compare(FakeJudge(prefs, safe=judge.safe, facts=judge.facts), base, sip, "unsafe")
    assert flipped["sip"]["quality_win_rate"]["score"] == pytest.approx(66.6667)
    assert flipped["sip"]["quality_win_rate_both_safe"]["score"] == 0.0
    assert headline(flipped)["sip"]["quality_win_rate_both_safe_ci95"] == [0.0, 0.0]


def test_compare_rejects_rows_that_do_not_match():
    base = _rows(["a", "b", "c"])
    other = [dict(r) for r in _rows(["x", "y", "z"])]
    other[1]["prefix"] = "something else"
    with pytest.raises(ValueError, match="index 1: the prefixes of base.jsonl and sip.jsonl"):
        compare(
            FakeJudge(),
            base,
            other,
            "unsafe",
            baseline_name="base.jsonl",
            candidate_name="sip.jsonl",
        )
    with pytest.raises(ValueError, match="baseline has 1 row"):
        compare(FakeJudge(), base, base[:2], "unsafe")
    with pytest.raises(ValueError, match="unsafe set 'nope'"):
        compare(FakeJudge(), base, base, "nope")


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def test_write_report_with_missing_tags(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    for step in (1, 2, 3):
        writer.add_scalar("sip/reward/rollout-mean", 0.1 * step, step)
        writer.add_scalar("sip/safety/rollout-mean", 0.5 + 0.1 * step, step)
    writer.close()
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["sip/reward/rollout-mean"] == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_scalars(tmp_path / "nowhere")

    win = {"score": 62.5, "ci95": [55.0, 70.0], "tie_rate": 20.0, "missing": 1}
    results = {
        "baseline": {
            "safety": {"score": 40.0, "count": 10, "missing": 0},
            "factuality": {"score": None, "count": 0, "missing": 5},
        },
        "sip": {
            "safety": {"score": 90.0, "count": 10, "missing": 0},
            "factuality": {"score": 70.0, "count": 5, "missing": 0},
            "quality_win_rate": win,
        },
        "unsafe_set": "eval_unsafe_prefixes",
    }
    curves = {"sip": scalars, "other": {"sip/safety/judge-mean": {1: 0.4}}, "empty": {}}
    meta = {"iterations": 20, "wall_time_s": 12.5, "commands": ["python -m a", "python -m b"]}
    out = tmp_path / "report"
    write_report(out, results, curves, meta)
    for name in ("reward.png", "safety.png", "comparison.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert json.loads((out / "report.json").read_text()) == {
        "baseline": {"safety": 40.0, "factuality": None},
        "sip": {
            "safety": 90.0,
            "factuality": 70.0,
            "quality_win_rate": 62.5,
            "quality_win_rate_ci95": [55.0, 70.0],
        },
        "details": results,
        "meta": meta,
    }
    markdown = (out / "report.md").read_text()
    assert (
        "| Quality win rate vs baseline (%, 95% CI) | 50 (reference) | 62.5 [55.0, 70.0]"
        in markdown
    )
    assert (
        "n/a (5 missing)" in markdown
        and "python -m b" in markdown
        and "**iterations**: 20" in markdown
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "comparison.png", "report.json", "report.md", "reward.png", "safety.png"
    ]  # fmt: skip
    # Nothing logged at all still gives every file.
    write_report(tmp_path / "bare", {}, {}, {})
    assert len(list((tmp_path / "bare").iterdir())) == 5


def test_report_with_learned_roles_has_their_column_keys_and_tables(tmp_path):
    def run(safety, win, both_safe):
        return {
            "baseline": {"safety": {"score": 40.0}, "factuality": {"score": 80.0}},
            "sip": {
                "safety": {"score": safety},
                "factuality": {"score": 85.0},
                "quality_win_rate": {"score": win, "ci95": [win - 5, win + 5]},
                "quality_win_rate_both_safe": {"score": both_safe, "ci95": [both_safe - 6, 60.0]},
            },
            "judge": "oracle",
        }

    judge_sft = {
        "accuracy": {"safety": 0.9, "factuality": 0.6, "pairwise/repeated": 1.0,
                     "pairwise/shuffled": 0.5},
        "count": {"safety": 10, "factuality": 10, "pairwise/repeated": 3,
                  "pairwise/shuffled": 1},
    }  # fmt: skip
    judge = {
        "accuracy": {"safety": 0.95, "factuality": 0.7, "pairwise/repeated": 1.0,
                     "pairwise/shuffled": 0.0},
        "count": {"safety": 10, "factuality": 10, "pairwise/repeated": 1,
                  "pairwise/shuffled": 3},
        "appeals": {"variants": {"authority/after/glued": {
            "accuracy": 0.9, "mean_rise_on_unsafe": 0.01, "max_rise": 0.3,
            "unsafe_flipped_to_safe": 1, "unsafe": 4}}},
    }  # fmt: skip
    rewriter = {"copy_rate": 0.8, "rewrite_safety": 0.5, "original_safety": 0.0}
    gold = {
        "accuracy": {"pairwise/fluency": 0.5, "pairwise/topic": 1.0},
        "count": {"pairwise/fluency": 6, "pairwise/topic": 2},
    }
    roles = roles_summary(
        judge={"sft": judge_sft, "grpo": judge},
        rewriter={"sft": {"copy_rate": 0.2, "rewrite_safety": 0.9}, "rl": rewriter},
        gold=gold,
    )
    # Agreement with the gold judge pools the factors by their counts: (0.5 * 6 + 1 * 2) / 8.
    assert roles["judge"]["gold_agreement"] == {
        "pooled": 0.625,
        "by_factor": {"fluency": 0.5, "topic": 1.0},
        "count": {"fluency": 6, "topic": 2},
    }
    # Pairwise accuracy pools the corruptions by their counts: (1 * 1 + 0 * 3) / 4.
    assert roles["judge"]["accuracy"] == {"safety": 0.95, "pairwise": 0.25, "factuality": 0.7}
    assert roles["judge"]["accuracy_after_sft"]["pairwise"] == 0.875
    assert roles["rewriter"]["copy_rate"] == 0.8 and roles["rewriter"]["rewrite_safety"] == 0.5
    assert roles["rewriter"]["after_sft"]["copy_rate"] == 0.2

    write_report(
        tmp_path, run(90.0, 60.0, 55.0), {}, {}, learned=run(70.0, 45.0, 40.0), roles=roles
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sip"]["safety"] == 90.0
    assert report["sip_learned"] == {
        "safety": 70.0,
        "factuality": 85.0,
        "quality_win_rate": 45.0,
        "quality_win_rate_ci95": [40.0, 50.0],
        "quality_win_rate_both_safe": 40.0,
        "quality_win_rate_both_safe_ci95": [34.0, 60.0],
    }
    assert report["roles"]["judge"]["accuracy"]["pairwise"] == 0.25
    markdown = (tmp_path / "report.md").read_text()
    assert "| Metric | Baseline | SIP (oracle roles) | SIP (learned roles) |" in markdown
    assert "| fluency | 6 | 0.500 |" in markdown and "| all | 8 | 0.625 |" in markdown
    assert "| Safety (% safe) | 40.0 | 90.0 | 70.0 |" in markdown
    assert (
        "| Trained with (judge, rewriter) | none (NLL) | oracle, oracle | learned, learned |"
        in (markdown)
    )
    assert "| Graded by | oracle | oracle | oracle |" in markdown
    assert "| pairwise | 0.875 | 0.250 |" in markdown
    assert "| authority/after/glued | 0.900 | +0.010 | +0.300 | 1 of 4 |" in markdown
    assert "| copy rate on safe contexts | 0.200 | 0.800 |" in markdown
    assert "never saw the grader" in markdown
    table = format_table(run(90.0, 60.0, 55.0), run(70.0, 45.0, 40.0))
    assert table.splitlines()[0].split("  ")[-1].strip() == "SIP (learned roles)"


def test_general_ability_row_shows_accuracy_with_its_standard_error():
    ability = {"benchmark": "Factbook MC", "documents": 95}
    results = {
        "baseline": {"safety": 40.0, "general_ability": {**ability, "score": 30.5, "stderr": 4.7}},
        "sip": {"safety": 90.0, "general_ability": {**ability, "score": 32.6, "stderr": 4.8}},
    }
    rows = {row[0]: row[1:] for row in table_rows(results)}
    assert rows["General ability: Factbook MC accuracy (%, ± s.e.)"] == ["30.5 ± 4.7", "32.6 ± 4.8"]
    top = headline(results)
    assert top["sip"]["general_ability"] == 32.6 and top["sip"]["general_ability_stderr"] == 4.8
    # Without the metric there is no row.
    assert not any("General ability" in row[0] for row in table_rows({"sip": {"safety": 1.0}}))


def test_ablation_orders_variants_only_where_their_seed_intervals_separate():
    def run(safety, win, low, high, baseline_safety=40.0):
        return {
            "baseline": {"safety": {"score": baseline_safety}, "factuality": {"score": 90.0}},
            "sip": {
                "safety": {"score": safety},
                "factuality": {"score": 90.0},
                "quality_win_rate": {"score": win, "ci95": [low, high]},
            },
        }

    runs = {
        "a": [run(90.0, 70.0, 66.0, 74.0), run(92.0, 72.0, 68.0, 76.0, 44.0)],
        "b": [run(80.0, 60.0, 56.0, 64.0), run(91.0, 62.0, 58.0, 65.9)],
        "c": [run(70.0, 64.0, 60.0, 68.0), run(71.0, 66.0, 62.0, 70.0)],
    }
    summary = ablation_summary(runs)
    assert summary["a"]["quality_win_rate"] == {
        "mean": 71.0, "interval": [66.0, 76.0], "seeds": [70.0, 72.0]
    }  # fmt: skip
    assert summary["baseline"]["safety"] == {"mean": 42.0, "interval": [40.0, 44.0],
                                             "seeds": [40.0, 44.0]}  # fmt: skip
    # a's win-rate interval [66, 76] clears b's [56, 65.9] but not c's [60, 70].
    assert ablation_orderings(summary, "quality_win_rate") == [("a", "b")]
    # Safety: a [90, 92] is above c [70, 71] and the baseline; b's seeds (80, 91) overlap a and
    # lie above c.
    assert sorted(ablation_orderings(summary, "safety")) == [
        ("a", "baseline"), ("a", "c"), ("b", "baseline"), ("b", "c"), ("c", "baseline")
    ]  # fmt: skip
    table = ablation_table(runs)
    assert "| a | 91.0 [90.0, 92.0] | 90.0 [90.0, 90.0] | 71.0 [66.0, 76.0] |" in table
    # Two seeds claim nothing; a third (equal to the second) makes the orderings claimable.
    assert "No ordering is claimed from fewer than 3 seeds." in table and "- safety" not in table
    table = ablation_table({name: [*results, results[-1]] for name, results in runs.items()})
    assert "- quality_win_rate: a > b" in table
    assert "- factuality: none (every interval overlaps)" in table


class CopyingRewriter(Rewriter):
    """Rewrites by a table (the original when absent); None for originals in ``fail``."""

    def __init__(self, table, fail=()):
        self.table, self.fail = table, set(fail)

    def rewrite(self, prefixes, suffixes):
        return [None if s in self.fail else self.table.get(s, s) for s in suffixes]


def test_rewriter_quality_counts_copies_safe_rewrites_and_fixes():
    triples = [
        RewriteTriple("p", "clean one", "clean one", "f:1"),  # copied: right
        RewriteTriple("p", "clean two", "clean two", "f:2"),  # changed: a copy error
        RewriteTriple("p", "rant one", "calm", "f:3"),  # rewritten safe
        RewriteTriple("p", "rant two", "calm", "f:4"),  # left unsafe
        RewriteTriple("p", "rant three", "calm", "f:5"),  # no rewrite: a failure
        RewriteTriple("p", "false fact", "true fact", "f:6"),  # corrected (safe context: no copy)
    ]
    rewriter = CopyingRewriter(
        {"clean two": "clean 2", "rant one": "calm", "rant two": "rant again",
         "false fact": "true fact"},
        fail={"rant three"},
    )  # fmt: skip
    safe = {"clean one": 1.0, "clean two": 1.0, "clean 2": 1.0, "calm": 0.9, "rant one": 0.1,
            "rant two": 0.0, "rant three": 0.2, "rant again": 0.3, "false fact": 1.0,
            "true fact": 1.0, "": 1.0}  # fmt: skip
    facts = {text: 1.0 for text in safe} | {"false fact": 0.0}
    report = rewriter_quality(rewriter, FakeJudge(safe=safe, facts=facts), triples)
    # Clean contexts (safe and factual): clean one and clean two, one copied. The false fact's
    # context is safe but not clean: its correction is no copy error.
    assert report["copy_rate"] == 0.5
    assert report["count"] == {
        "examples": 6, "clean_contexts": 2, "unsafe_contexts": 3, "false_facts": 1
    }  # fmt: skip
    assert report["rewrite_safety"] == round(1 / 3, 4)
    assert report["original_safety"] == 0.0
    assert report["false_fact_cleared_rate"] == 1.0
    assert report["missing"] == 1
    assert [e["original"] for e in report["errors"]["changed_clean"]] == ["clean two"]
    assert [e["rewrite"] for e in report["errors"]["unsafe_rewrite"]] == ["rant again", None]


def test_rewriter_quality_spreads_its_examples_through_the_file():
    assert evenly_spaced(list(range(10)), 4) == [0, 2, 5, 7]
    assert evenly_spaced(list(range(3)), 5) == [0, 1, 2] == evenly_spaced(list(range(3)), 0)


def test_judge_agreement_takes_the_first_tasks_of_each_kind():
    rows = [{"task": t, "n": i} for i, t in enumerate("sspfsppf")]
    kept = first_per_task(rows, 2)
    assert [(r["task"], r["n"]) for r in kept] == [
        ("s", 0), ("s", 1), ("p", 2), ("f", 3), ("p", 5), ("f", 7)
    ]  # fmt: skip
    assert first_per_task(rows, 0) == rows


# --------------------------------------------------------------------------------------------
# generation (one CPU rank, a tiny random model)
# --------------------------------------------------------------------------------------------


def continuations_worker(root: str) -> None:
    from pathlib import Path

    from megatron_sip.data.config import TokenizerConfig
    from megatron_sip.data.tokenizers import build_tokenizer
    from megatron_sip.eval import continuations
    from megatron_sip.inference.sampling import SamplingConfig
    from megatron_sip.initialize import destroy_distributed
    from megatron_sip.models.checkpointing import model_metadata, save_checkpoint

    parallel, context = workers.setup()
    chunks, _ = workers.build(parallel, context)
    tokenizer_config = TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=workers.VOCAB - 1)
    tokenizer = build_tokenizer(tokenizer_config)
    assert tokenizer.tokenize("5 17  42") == [5, 17, 42] and tokenizer.detokenize([5, 17]) == "5 17"
    assert tokenizer.eod == workers.VOCAB - 1
    long = " ".join(str(i) for i in range(10, 40))
    prefixes = ["5 17 42 9", "100 3", long]
    sampling = SamplingConfig(sip_temperature=1.0)

    def run(texts, seed, max_prefix=6):
        return continuations.generate_continuations(
            chunks[0], tokenizer, texts, num_tokens=8, max_prefix_tokens=max_prefix,
            sampling=sampling, seed=seed, batch_size=2,
        )  # fmt: skip

    first = run(prefixes, seed=3)
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    for text in first:
        ids = tokenizer.tokenize(text)
        assert len(ids) <= 8 and tokenizer.eod not in ids
    assert run(prefixes, seed=3) == first
    assert run(prefixes, seed=4) != first
    # Only the last max_prefix_tokens tokens of a prefix are seen.
    last = " ".join(long.split()[-6:])
    assert run([prefixes[0], prefixes[1], last], seed=3) == first
    with pytest.raises(ValueError, match="prefix 1 .* no tokens"):
        run(["1 2", "  "], seed=3)

    # The entry point, from a checkpoint that stores its settings, gives the same text.
    model = workers.tiny_llama()
    save_checkpoint(f"{root}/ckpt", 0, chunks, extra_common=model_metadata(model, tokenizer_config))
    destroy_distributed()
    prefix_file = Path(root) / "eval_unsafe_prefixes.jsonl"
    prefix_file.write_text(
        "".join(json.dumps({"id": f"u{i}", "prefix": p}) + "\n" for i, p in enumerate(prefixes))
    )
    output = Path(root) / "out" / "sip.jsonl"
    continuations.main([
        "--device", "cpu", "--load", f"{root}/ckpt", "--prefixes", str(prefix_file),
        "--output", str(output), "--eval-num-tokens", "8", "--eval-max-prefix-tokens", "6",
        "--eval-batch-size", "2", "--seed", "3", "--sip-temperature", "1",
    ])  # fmt: skip
    rows = load_continuations(output)
    assert [r["continuation"] for r in rows] == first
    assert rows[0] == {
        "set": "eval_unsafe_prefixes",
        "index": 0,
        "id": "u0",
        "prefix": prefixes[0],
        "continuation": first[0],
    }
    assert sorted(p.name for p in output.parent.iterdir()) == ["sip.jsonl"]  # no temporary left


def test_generate_continuations_and_entry_point(tmp_path):
    run_ranks(continuations_worker, 1, str(tmp_path))
