"""The zero-shot benchmarks' local task configs (``megatron_sip.eval.benchmarks``): each reads a
file in its benchmark's own schema and asks lm-eval's own prompts.

A recording model answers each request from a hand-written table of the prompts the upstream
task asks (context -> the continuation it prefers): a prompt the table does not hold fails the
test, and lm-eval's accuracy must equal the hand count of the table's preferences."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from megatron_sip.errors import ConfigError  # noqa: E402
from megatron_sip.eval.benchmarks import (  # noqa: E402
    BENCHMARKS,
    check_benchmark_file,
    run_benchmarks,
    task_config,
)

# name -> (documents in the benchmark's schema, [(context, preferred continuation, is gold)]).
CASES = {
    "boolq": (
        [
            {"question": "is the sky blue", "title": "Sky", "answer": True,
             "passage": "The sky is blue on a clear day."},
            {"question": "do fish fly", "title": "Fish", "answer": False,
             "passage": "Fish swim in water."},
        ],
        [
            ("The sky is blue on a clear day.\nQuestion: is the sky blue?\nAnswer:", " yes", True),
            ("Fish swim in water.\nQuestion: do fish fly?\nAnswer:", " yes", False),
        ],
    ),
    "piqa": (
        [
            {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
            {"goal": "Dry hair", "sol1": "Use water.", "sol2": "Use a towel.", "label": 1},
            {"goal": "Boil an egg", "sol1": "Heat water.", "sol2": "Freeze it.", "label": 0},
        ],
        [
            ("Question: Open a jar\nAnswer:", " Twist the lid.", True),
            ("Question: Dry hair\nAnswer:", " Use a towel.", True),
            ("Question: Boil an egg\nAnswer:", " Freeze it.", False),
        ],
    ),
    "hellaswag": (
        [
            {"activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he",
             "endings": ["pours it in a pan.", "sings.", "flies away.", "sleeps."], "label": "0"},
            {"activity_label": "Running", "ctx_a": "A woman laces her shoes.", "ctx_b": "she",
             "endings": ["eats.", "reads.", "starts running.", "swims."], "label": "2"},
        ],
        [
            ("Cooking: A man cracks an egg. He", " pours it in a pan.", True),
            ("Running: A woman laces her shoes. She", " swims.", False),
        ],
    ),
    "arc_easy": (
        [
            {"id": "q1", "question": "What do plants need?",
             "choices": {"text": ["Light", "Sand", "Noise"], "label": ["A", "B", "C"]},
             "answerKey": "A"},
            {"id": "q2", "question": "What melts ice?",
             "choices": {"text": ["Cold", "Dark", "Heat", "Wind"], "label": ["1", "2", "3", "4"]},
             "answerKey": "3"},
        ],
        [
            ("Question: What do plants need?\nAnswer:", " Light", True),
            ("Question: What melts ice?\nAnswer:", " Heat", True),
        ],
    ),
    "arc_challenge": (
        [
            {"id": "q1", "question": "Which is a gas?",
             "choices": {"text": ["Rock", "Steam"], "label": ["A", "B"]}, "answerKey": "B"},
        ],
        [("Question: Which is a gas?\nAnswer:", " Rock", False)],
    ),
    "openbookqa": (
        [
            {"id": "7", "question_stem": "The sun is a",
             "choices": {"text": ["star", "moon", "rock", "tree"],
                         "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
        ],
        [("The sun is a", " star", True)],
    ),
    "siqa": (
        [
            {"context": "Ann dropped her cup.", "question": "What will Ann do next?",
             "answerA": "Pick it up", "answerB": "Fly", "answerC": "Vanish", "label": "1"},
            {"context": "Bo won the race.", "question": "How does Bo feel?",
             "answerA": "Sad", "answerB": "Happy", "answerC": "Asleep", "label": "2"},
        ],
        [
            ("Q: Ann dropped her cup. What will Ann do next?\nA:", " Pick it up", True),
            ("Q: Bo won the race. How does Bo feel?\nA:", " Sad", False),
        ],
    ),
    "mmlu": (
        [
            {"question": "What is 2 + 2? ", "subject": "elementary_mathematics",
             "choices": ["3", "4", "5", "6"], "answer": 1},
            {"question": "Which organ pumps blood?", "subject": "anatomy",
             "choices": ["Heart", "Lung", "Skin", "Bone"], "answer": 0},
        ],
        [
            ("The following are multiple choice questions (with answers) about elementary "
             "mathematics.\n\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", " B", True),
            ("The following are multiple choice questions (with answers) about anatomy.\n\n"
             "Which organ pumps blood?\nA. Heart\nB. Lung\nC. Skin\nD. Bone\nAnswer:", " C",
             False),
        ],
    ),
    "factbook_mc": (
        [
            {"question": "The capital of Elbonia is", "country": "Elbonia", "kind": "capital",
             "choices": ["Mudville.", "Paris.", "Oslo.", "Lima."], "answer": 0},
            {"question": "Elbonia has a population of about", "country": "Elbonia",
             "kind": "population",
             "choices": ["1,000 people.", "9,000 people.", "3,000 people.", "20 people."],
             "answer": 2},
        ],
        [
            ("The capital of Elbonia is", " Mudville.", True),
            ("Elbonia has a population of about", " 20 people.", False),
        ],
    ),
}  # fmt: skip


def _write(path, rows) -> str:
    if path.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _recording_lm(preferences: dict[str, str], seen: list):
    from lm_eval.api.model import LM

    class Recording(LM):
        """Log-likelihood 0 for the table's preferred continuation of a context, -1 else."""

        def loglikelihood(self, requests, disable_tqdm=False):
            out = []
            for request in requests:
                context, continuation = request.args
                seen.append(context)
                out.append((0.0 if preferences.get(context) == continuation else -1.0, False))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise AssertionError("multiple choice asks no rolling log-likelihoods")

        def generate_until(self, requests, disable_tqdm=False):
            raise AssertionError("multiple choice asks no generation")

    return Recording()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_every_benchmark_has_a_case():
    assert set(CASES) == set(BENCHMARKS)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_local_tasks_ask_the_upstream_prompts_and_count_like_a_hand_count(tmp_path, suffix):
    files, preferences, hand = {}, {}, {}
    for name, (docs, table) in CASES.items():
        files[name] = _write(tmp_path / f"{name}{suffix}", docs)
        preferences.update({context: continuation for context, continuation, _ in table})
        hand[name] = 100.0 * sum(gold for *_, gold in table) / len(table)
    seen: list = []
    results = run_benchmarks(_recording_lm(preferences, seen), files, tmp_path / "tasks", None)
    unknown = sorted(set(seen) - set(preferences))
    assert not unknown, f"prompts the upstream tasks do not ask: {unknown}"
    assert set(preferences) <= set(seen)
    for name, (docs, _) in CASES.items():
        assert results[name]["acc"] == pytest.approx(hand[name]), name
        assert results[name]["documents"] == len(docs)
        assert results[name]["task"] == BENCHMARKS[name].task
        assert not results[name]["limited"]


def test_limit_is_reported(tmp_path):
    docs, table = CASES["piqa"]
    files = {"piqa": _write(tmp_path / "piqa.jsonl", docs)}
    preferences = {context: continuation for context, continuation, _ in table}
    results = run_benchmarks(_recording_lm(preferences, []), files, tmp_path / "tasks", 2)
    assert results["piqa"]["documents"] == 2 and results["piqa"]["limited"]
    assert results["piqa"]["acc"] == pytest.approx(100.0)


def test_task_configs_include_lm_eval_s_own(tmp_path):
    config = task_config("arc_challenge", str(tmp_path / "arc.parquet"))
    assert config["include"].endswith("lm_eval/tasks/arc/arc_challenge.yaml")
    assert config["dataset_path"] == "parquet" and config["dataset_name"] is None
    assert config["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "arc.parquet")


def test_bad_benchmark_files_name_the_flag_and_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--piqa-data.*does not exist"):
        check_benchmark_file("piqa", str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match=r"--piqa-data.*expected a \.jsonl"):
        check_benchmark_file("piqa", str(tmp_path / "piqa.csv"))
    wrong = _write(tmp_path / "piqa.jsonl", [{"goal": "x", "sol1": "a", "sol2": "b"}])
    with pytest.raises(ConfigError, match=r"--piqa-data.*piqa\.jsonl.*missing columns \['label'\]"):
        check_benchmark_file("piqa", wrong)
    no_label = _write(tmp_path / "boolq.jsonl", [{"question": "q", "passage": "p"}])
    with pytest.raises(ConfigError, match=r"--boolq-data.*label \(or answer\)"):
        check_benchmark_file("boolq", no_label)
    docs, _ = CASES["mmlu"]
    assert check_benchmark_file("mmlu", _write(tmp_path / "mmlu.parquet", docs)) == 2
