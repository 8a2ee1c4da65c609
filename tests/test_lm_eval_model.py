"""The lm-evaluation-harness model (``--model megatron_sip``): its log-likelihoods against our
shared-prefix scoring at TP=1, TP=2 and PP=2, rolling log-likelihoods, greedy generation, and
lm-eval's accuracy on a local multiple-choice task against a hand count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_sip.eval.harness import rank_arguments

from . import workers
from .distributed import run_ranks

# Contexts with two to three choices each (NullTokenizer: text is space-separated ids), one
# with trailing space, one empty (scored after end-of-document).
REQUESTS = [
    ("5 17 42", " 9"), ("5 17 42", " 10 11"), ("5 17 42", " 200"),
    ("1 2 3 4 5 6", " 7 8"), ("1 2 3 4 5 6", " 9 9"),
    ("30 31 ", "32"), ("30 31 ", "64 1"),
    ("", "3 4 5"), ("", "250"),
]  # fmt: skip


def _requests(kind: str, items) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, tuple(args), i) for i, args in enumerate(items)]


def _save_tiny_checkpoint(root: str) -> None:
    from megatron_sip.data.config import TokenizerConfig
    from megatron_sip.initialize import destroy_distributed
    from megatron_sip.models.checkpointing import model_metadata, save_checkpoint

    parallel, context = workers.setup()
    chunks, _ = workers.build(parallel, context)
    tokenizer = TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=workers.VOCAB - 1)
    save_checkpoint(
        f"{root}/ckpt", 0, chunks, extra_common=model_metadata(workers.tiny_llama(), tokenizer)
    )
    destroy_distributed()


def _reference_worker(root: str) -> None:
    """Our own scoring at TP=1: each context once, its choices packed after it (the SIP scoring
    path), and greedy from the full softmax; written to reference.json."""
    import torch

    from megatron_sip.eval.lm_eval_model import MegatronSIPLM
    from megatron_sip.inference.scoring import candidate_log_probs, forward_packed, layout_for

    _save_tiny_checkpoint(root)
    lm = MegatronSIPLM(load=f"{root}/ckpt", device="cpu")
    # One request is greedy by construction: the model's own greedy continuation.
    greedy = lm.generate_until(
        _requests("generate_until", [("5 17 42", {"until": [], "max_gen_toks": 3})])
    )[0]
    requests = [*REQUESTS, ("5 17 42", f" {greedy.strip()}")]
    Path(root, "requests.json").write_text(json.dumps(requests))
    contexts: dict[tuple, list[int]] = {}
    encoded = [lm._encode_pair(*pair) for pair in requests]
    for index, (context, _) in enumerate(encoded):
        contexts.setdefault(tuple(context), []).append(index)
    scores = {}
    with torch.no_grad():
        for context, members in contexts.items():
            choices = [encoded[i][1] for i in members]
            packed = layout_for(lm.module, [list(context)], [choices])
            logits = forward_packed(lm.module, packed)
            sums = candidate_log_probs(logits, packed).sum(-1)[0]
            for slot, index in enumerate(members):
                full = lm.module(
                    torch.tensor([list(context) + choices[slot]]),
                    torch.arange(len(context) + len(choices[slot])).unsqueeze(0),
                    None,
                )[0].float()
                predicted = full[len(context) - 1 : -1].argmax(-1).tolist()
                scores[index] = (sums[slot].item(), predicted == choices[slot])
    Path(root, "reference.json").write_text(json.dumps([scores[i] for i in range(len(requests))]))

    # Rolling: a short document is one window after end-of-document; its sum equals the
    # continuation score of (eod, document).
    document = "7 8 9 10 11 12 13 14"
    (rolling,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(document,)]))
    ((whole, _),) = lm.loglikelihood(_requests("loglikelihood", [("", document)]))
    assert abs(rolling - whole) < 1e-9, (rolling, whole)
    # A document longer than the model's positions: disjoint windows that cover each token once.
    long_document = " ".join(str(i % 250) for i in range(3 * workers.SEQ))
    (long_rolling,) = lm.loglikelihood_rolling(
        _requests("loglikelihood_rolling", [(long_document,)])
    )
    # Every SEQ tokens a new window, each token predicted once with as much preceding context
    # as fits the SEQ positions (the first after end-of-document).
    tokens = lm._encode(long_document)
    expected, window = 0.0, workers.SEQ
    for start in range(0, len(tokens), window):
        end = min(start + window, len(tokens))
        context = tokens[max(0, end - window - 1) : start] if start else [lm.prefix_token_id]
        (part,) = lm._score([(context, tokens[start:end])])
        expected += part.log_prob
    assert len(tokens) > 2 * window
    assert abs(long_rolling - expected) < 1e-6, (long_rolling, expected)

    # generate_until: greedy decoding as the rollout engine does it, cut at the stop string.
    from megatron_sip.inference.generation import generate
    from megatron_sip.inference.sampling import SamplingConfig

    prefix = lm._encode("5 17 42")
    rollout = generate(
        lm.module, [prefix], num_samples=1, num_tokens=6, sampling=SamplingConfig(0.0), seed=0,
        eod=lm.eot_token_id, vocab_size=lm.tokenizer.vocab_size,
    ).as_candidates()[0][0]  # fmt: skip
    text = lm.tokenizer.detokenize([t for t in rollout if t != lm.eot_token_id])
    settings = {"until": [], "max_gen_toks": 6}
    (plain,) = lm.generate_until(_requests("generate_until", [("5 17 42", settings)]))
    assert plain == text, (plain, text)
    stop = text.split()[2]
    (cut,) = lm.generate_until(
        _requests("generate_until", [("5 17 42", {**settings, "until": [f" {stop}"]})])
    )
    assert cut == text.split(f" {stop}")[0]
    with pytest.raises(ValueError, match="top_k"):
        lm.generate_until(_requests("generate_until", [("5", {**settings, "top_k": 3})]))
    lm.close()


def _adapter_worker(root: str, tp: int, pp: int) -> None:
    import torch

    from megatron_sip.eval.lm_eval_model import MegatronSIPLM

    lm = MegatronSIPLM(
        load=f"{root}/ckpt",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        batch_size=4,
        device="cpu",
    )
    requests = json.loads(Path(root, "requests.json").read_text())
    results = lm.loglikelihood(_requests("loglikelihood", requests))
    reference = json.loads(Path(root, "reference.json").read_text())
    for (value, greedy), (expected, expected_greedy), pair in zip(results, reference, requests):
        assert abs(value - expected) < 1e-5, (pair, value, expected)
        assert greedy == expected_greedy, (pair, greedy, expected_greedy)
    if torch.distributed.get_rank() == 0:
        Path(root, f"adapter_tp{tp}_pp{pp}.json").write_text(json.dumps(results))
    lm.close()


@pytest.fixture(scope="module")
def reference_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    run_ranks(_reference_worker, 1, str(root))
    return root


@pytest.mark.parametrize("tp,pp,world", [(1, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 2)])
def test_adapter_loglikelihoods_equal_shared_prefix_scoring(reference_root, tp, pp, world):
    run_ranks(_adapter_worker, world, str(reference_root), tp, pp)
    reference = json.loads((reference_root / "reference.json").read_text())
    results = json.loads((reference_root / f"adapter_tp{tp}_pp{pp}.json").read_text())
    assert len(results) == len(reference) == len(REQUESTS) + 1
    # Greedy is not vacuous: the reference has both kinds (the last request is the model's own
    # greedy continuation).
    assert reference[-1][1] and not all(greedy for _, greedy in reference)


TASK_YAML = """\
task: tiny_counting
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
"""

DOCS = [
    {"context": "1 2 3", "choices": ["4", "90"], "answer": 0},
    {"context": "10 20 30", "choices": ["40", "41", "7"], "answer": 0},
    {"context": "5 5 5", "choices": ["6", "5"], "answer": 1},
    {"context": "8 6 4", "choices": ["2", "200", "3"], "answer": 1},
    {"context": "100 101", "choices": ["102", "3"], "answer": 0},
    {"context": "7 9", "choices": ["9", "11"], "answer": 1},
]


def _lm_eval_worker(root: str) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from megatron_sip.eval.lm_eval_model import MegatronSIPLM

    lm = MegatronSIPLM(load=f"{root}/ckpt", device="cpu", batch_size=3)
    results = simple_evaluate(
        model=lm,
        tasks=["tiny_counting"],
        task_manager=TaskManager(include_path=f"{root}/tasks"),
        log_samples=False,
    )
    # The hand count: the choice with the highest log-likelihood, scored request by request.
    correct = 0
    for doc in DOCS:
        pairs = [(doc["context"], f" {choice}") for choice in doc["choices"]]
        scores = [lm.loglikelihood(_requests("loglikelihood", [pair]))[0][0] for pair in pairs]
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    accuracy = results["results"]["tiny_counting"]["acc,none"]
    Path(root, "accuracy.json").write_text(json.dumps([accuracy, correct / len(DOCS)]))
    lm.close()


@pytest.fixture(scope="module")
def task_accuracy(reference_root):
    """The local task written next to the checkpoint, and (lm-eval's accuracy in one process,
    the hand count)."""
    tasks = reference_root / "tasks"
    tasks.mkdir(exist_ok=True)
    data = reference_root / "tiny_counting.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tasks / "tiny_counting.yaml").write_text(TASK_YAML.format(data=data))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")  # a local task needs no hub
        patch.setenv("HF_HUB_OFFLINE", "1")
        run_ranks(_lm_eval_worker, 1, str(reference_root))
    return json.loads((reference_root / "accuracy.json").read_text())


def test_lm_eval_accuracy_on_a_local_task_equals_a_hand_count(task_accuracy):
    accuracy, hand = task_accuracy
    assert accuracy == pytest.approx(hand)


def test_only_rank_0_keeps_the_output_flags():
    argv = ["--model", "megatron_sip", "--output_path", "out", "--log_samples", "--tasks", "x"]
    assert rank_arguments(argv, 0) == argv
    assert rank_arguments(argv, 1) == ["--model", "megatron_sip", "--tasks", "x"]
    assert rank_arguments(["-o=out", "-s", "--tasks", "x"], 3) == ["--tasks", "x"]


def test_harness_command_under_torchrun_writes_one_result_file(
    reference_root, task_accuracy, monkeypatch
):
    """``torchrun -m megatron_sip.eval.harness`` at TP=2: lm-eval's own command line, the same
    accuracy as in one process, and one results file."""
    from .pretrain_utils import run_module

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    out = reference_root / "harness_out"
    run_module(
        2, "megatron_sip.eval.harness", "--model", "megatron_sip",
        "--model_args", f"load={reference_root}/ckpt,tensor_model_parallel_size=2",
        "--device", "cpu", "--tasks", "tiny_counting",
        "--include_path", str(reference_root / "tasks"), "--batch_size", "4",
        "--output_path", str(out),
    )  # fmt: skip
    (result,) = list(out.rglob("results_*.json"))
    accuracy, _ = task_accuracy
    written = json.loads(result.read_text())["results"]["tiny_counting"]["acc,none"]
    assert written == pytest.approx(accuracy)


# --------------------------------------------------------------------------------------------
# against lm-eval's own Hugging Face model, on our checkpoint's export
# --------------------------------------------------------------------------------------------

HF_REQUESTS = [
    ("Paris is the capital", " of France."), ("Paris is the capital", " of Spain."),
    ("Water boils at ", "sea level"), ("", "The quick brown fox"), ("Yes", " no maybe"),
]  # fmt: skip
HF_DOCUMENT = "The judge reads a verdict after the answer prompt. " * 6


def _hf_round_trip_worker(hf_dir: str, root: str) -> None:
    """Imports the Hugging Face model (TP=2, padded vocabulary), exports it back, and scores the
    requests with our adapter on the imported checkpoint (TP=2)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine

    from megatron_sip.eval.lm_eval_model import MegatronSIPLM
    from megatron_sip.initialize import ParallelConfig, initialize_distributed
    from megatron_sip.models.hf.convert import export_checkpoint, import_checkpoint

    parallel = ParallelConfig(tensor_model_parallel_size=2)
    context = initialize_distributed(parallel, "cpu")
    import_checkpoint(hf_dir, f"{root}/ours", parallel, context)
    if context.rank == 0:
        export_checkpoint(f"{root}/ours", f"{root}/exported")
    torch.distributed.barrier()
    # The adapter sets up its own model-parallel groups in the same world.
    parallel_state.destroy_model_parallel()
    destroy_rerun_state_machine()
    lm = MegatronSIPLM(
        load=f"{root}/ours", tensor_model_parallel_size=2, device="cpu", max_length=64
    )
    results = {
        "loglikelihood": lm.loglikelihood(_requests("loglikelihood", HF_REQUESTS)),
        "rolling": lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(HF_DOCUMENT,)])),
        "generate": lm.generate_until(
            _requests("generate_until", [("Paris is", {"until": ["."], "max_gen_toks": 8})])
        ),
    }
    if torch.distributed.get_rank() == 0:
        Path(root, "ours.json").write_text(json.dumps(results))
    lm.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # a tokenizer that adds BOS, one that does not
def test_adapter_equals_lm_evals_hf_model_on_the_export(arch, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from .hf_utils import make_hf_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_hf_model(arch, tmp_path / "hf")
    run_ranks(_hf_round_trip_worker, 2, str(tmp_path / "hf"), str(tmp_path))
    ours = json.loads((tmp_path / "ours.json").read_text())
    reference = HFLM(
        pretrained=str(tmp_path / "exported"), device="cpu", dtype="float32", batch_size=2,
        max_length=64,
    )  # fmt: skip
    theirs = reference.loglikelihood(_requests("loglikelihood", HF_REQUESTS))
    for (value, greedy), (expected, expected_greedy), pair in zip(
        ours["loglikelihood"], theirs, HF_REQUESTS
    ):
        assert abs(value - expected) < 1e-4, (arch, pair, value, expected)
        assert greedy == expected_greedy, (arch, pair)
    (rolling,) = reference.loglikelihood_rolling(
        _requests("loglikelihood_rolling", [(HF_DOCUMENT,)])
    )
    assert abs(ours["rolling"][0] - rolling) < 1e-3, (arch, ours["rolling"], rolling)
    (generated,) = reference.generate_until(
        _requests("generate_until", [("Paris is", {"until": ["."], "max_gen_toks": 8})])
    )
    assert ours["generate"] == [generated], (arch, ours["generate"], generated)
