"""``python -m megatron_sip.evaluate``: two checkpoints (tiny Hugging Face Llamas imported, so that
the text is English words) continue held-out prefixes under torchrun; the oracle judges; the
report's numbers equal the metrics computed apart from its continuations; coherence and its
refusal; bad flags."""

from __future__ import annotations

import json

import pytest

from megatron_sip.errors import ConfigError
from megatron_sip.evaluate import EvaluateConfig
from megatron_sip.roles.oracle import OracleJudge

from .distributed import run_ranks
from .hf_utils import TEXT, make_hf_model
from .pretrain_utils import run_module
from .test_benchmarks import CASES

PREFIXES = {
    "eval_unsafe_prefixes": ["Paris is the capital of", "The judge reads a", "Safety first:"],
    "eval_safe_prefixes": ["Water boils at", "The quick brown fox", "Yes no"],
}


def _import(hf_dirs: dict, root: str) -> None:
    from megatron_sip.initialize import ParallelConfig, destroy_distributed, initialize_distributed
    from megatron_sip.models.hf.convert import import_checkpoint

    parallel = ParallelConfig()
    context = initialize_distributed(parallel, "cpu")
    for name, directory in hf_dirs.items():
        import_checkpoint(directory, f"{root}/{name}", parallel, context, seq_length=64)
    destroy_distributed()


def _oracle_data(directory) -> None:
    """An oracle over the tokenizer's text: its word pairs read as prose, "passwords" unsafe,
    France's capital known."""
    from megatron_sip.data.demo_corpus import word_tokens

    words = word_tokens(TEXT)
    knowledge = {
        "france": {"name": "France", "capital": "Paris", "population": 68000000,
                   "area_sq_km": 643801, "government": "semi-presidential republic"},
    }  # fmt: skip
    data = {
        "knowledge_base": knowledge,
        "lexicon": ["passwords"],
        "reference_bigrams": sorted({f"{a} {b}" for a, b in zip(words, words[1:])}),
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "oracle.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    dirs = {}
    for seed, name in enumerate(("baseline", "candidate")):
        make_hf_model("llama", root / f"hf_{name}", seed=seed)
        dirs[name] = str(root / f"hf_{name}")
    run_ranks(_import, 1, dirs, str(root))
    for set_name, prefixes in PREFIXES.items():
        (root / f"{set_name}.jsonl").write_text(
            "".join(
                json.dumps({"id": f"{set_name}{i}", "prefix": p}) + "\n"
                for i, p in enumerate(prefixes)
            )  # fmt: skip
        )
    _oracle_data(root / "oracle")
    for name in ("piqa", "factbook_mc"):
        docs, _ = CASES[name]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root


@pytest.mark.slow
def test_evaluate_writes_the_report_its_continuations_give(checkpoints):
    from megatron_sip.eval.claims import KnowledgeBaseSource, claim_factuality
    from megatron_sip.eval.compare import compare, pair_outcomes, win_rate_summary
    from megatron_sip.eval.continuations import load_continuations

    root, out = checkpoints, checkpoints / "report"
    output = run_module(
        2, "megatron_sip.evaluate", "--device", "cpu",
        "--load", str(root / "candidate"), "--baseline-load", str(root / "baseline"),
        "--prefixes", str(root / "eval_unsafe_prefixes.jsonl"),
        str(root / "eval_safe_prefixes.jsonl"),
        "--judge-backend", "oracle", "--judge-oracle-data", str(root / "oracle"),
        "--claim-knowledge", str(root / "oracle"), "--output-dir", str(out),
        "--eval-num-tokens", "16", "--eval-batch-size", "2", "--sip-temperature", "1",
        "--tensor-model-parallel-size", "2", "--piqa-data", str(root / "piqa.jsonl"),
        "--factbook-mc-data", str(root / "factbook_mc.jsonl"), "--benchmark-batch-size", "3",
    )  # fmt: skip
    assert "Quality win rate" in output
    report = json.loads((out / "evaluation.json").read_text())
    candidate = load_continuations(out / "candidate.jsonl")
    baseline = load_continuations(out / "baseline.jsonl")
    assert len(candidate) == len(baseline) == 6
    assert [r["prefix"] for r in candidate] == [p for ps in PREFIXES.values() for p in ps]
    assert candidate != baseline  # two different models
    # The same metrics, computed apart from the written continuations.
    judge = OracleJudge(str(root / "oracle"))
    expected = compare(judge, baseline, candidate, "eval_unsafe_prefixes")
    for name in ("baseline", "sip"):
        for metric in ("safety", "factuality"):
            assert report[name][metric] == expected[name][metric], (name, metric)
    assert report["sip"]["quality_win_rate"] == expected["sip"]["quality_win_rate"]
    prefixes = [r["prefix"] for r in baseline]
    texts = [r["continuation"] for r in candidate], [r["continuation"] for r in baseline]
    coherence = win_rate_summary(
        pair_outcomes(judge.prefer_coherence(prefixes, *texts),
                      judge.prefer_coherence(prefixes, texts[1], texts[0]))
    )  # fmt: skip
    assert report["sip"]["coherence_win_rate"] == coherence
    source = KnowledgeBaseSource(str(root / "oracle"))
    assert report["sip"]["claim_factuality"] == claim_factuality(prefixes, texts[0], source)
    assert report["checkpoints"] == {
        "candidate": str(root / "candidate"),
        "baseline": str(root / "baseline"),
    }
    quality = report["sip"]["quality_win_rate"]
    assert quality["count"] + quality["missing"] == 6
    assert quality["position_consistency"] == pytest.approx(
        100 * (quality["wins"] + quality["losses"]) / quality["count"]
    )
    markdown = (out / "evaluation.md").read_text()
    assert "Coherence win rate" in markdown and "Supported claims" in markdown
    # The benchmarks at TP=2 inside evaluate equal the benchmark tool's in one process.
    assert "factbook_mc acc" in markdown
    for name, load in (("sip", "candidate"), ("baseline", "baseline")):
        run_module(
            1, "megatron_sip.eval.benchmarks", "--device", "cpu", "--load", str(root / load),
            "--piqa-data", str(root / "piqa.jsonl"), "--factbook-mc-data",
            str(root / "factbook_mc.jsonl"), "--output", str(root / f"bench_{load}.json"),
        )  # fmt: skip
        alone = json.loads((root / f"bench_{load}.json").read_text())["benchmarks"]
        assert set(alone) == set(report["benchmarks"]) == {"piqa", "factbook_mc"}
        for bench, entry in alone.items():
            inside = report["benchmarks"][bench][name]
            assert inside["documents"] == entry["documents"] == len(CASES[bench][0])
            for metric in ("acc", "acc_norm"):
                assert inside[metric] == pytest.approx(entry[metric]), (name, bench, metric)
    assert (out / "evaluation.png").stat().st_size > 0


def test_oracle_coherence_prefers_on_topic_text_that_does_not_loop(tmp_path):
    _oracle_data(tmp_path)
    judge = OracleJudge(str(tmp_path))
    prefix = "Paris is the capital of France and the judge reads a verdict."
    on_topic = "The judge in Paris reads the verdict of France after the answer prompt today."
    looping = "the judge the judge the judge the judge the judge the judge the judge"
    off_topic = "Water boils at sea level when the quick brown fox jumps over the dog."
    (first, second) = judge.prefer_coherence([prefix] * 2, [on_topic] * 2, [looping, off_topic])
    assert first > 0.5 and second > 0.5
    # Coherence ignores fluency: a shuffled on-topic text is as coherent, not as good prose.
    shuffled = " ".join(reversed(on_topic.rstrip(".").split())) + "."
    (coherent,) = judge.prefer_coherence([prefix], [on_topic], [shuffled])
    (prose,) = judge.prefer([prefix], [on_topic], [shuffled])
    assert coherent == pytest.approx(0.5) and prose > 0.5


def test_a_pack_without_coherence_refuses_it():
    from megatron_sip.roles.prompts import PromptedJudge, PromptSet

    class Judge(PromptedJudge):
        def verdicts(self, name, prompts):
            return [1.0] * len(prompts)

    packaged = Judge(PromptSet.load("default"), 300)
    assert packaged.prefer_coherence(["p"], ["a"], ["b"]) == [1.0]
    demo = Judge(PromptSet.load("examples/demo/prompts"), 300)
    with pytest.raises(NotImplementedError, match="no coherence verdict"):
        demo.prefer_coherence(["p"], ["a"], ["b"])


def test_flags_are_checked_before_anything_runs(tmp_path):
    base = dict(load="a", baseline_load="b", prefixes=["p.jsonl"], output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="--claim-knowledge"):
        EvaluateConfig(**base)
    with pytest.raises(ConfigError, match="does not exist"):
        EvaluateConfig(**base, claim_knowledge=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="--eval-skip"):
        EvaluateConfig(**base, eval_skip=["quality"])
    with pytest.raises(ConfigError, match="--baseline-load"):
        EvaluateConfig(**{**base, "baseline_load": None}, eval_skip=["claims"])
    with pytest.raises(ConfigError, match="share a stem"):
        EvaluateConfig(**{**base, "prefixes": ["a/x.jsonl", "b/x.jsonl"]}, eval_skip=["claims"])
    assert EvaluateConfig(**base, eval_skip=["claims", "coherence"]).eval_skip
