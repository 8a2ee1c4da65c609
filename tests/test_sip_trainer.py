"""The SIP trainer: one step at TP=2 and PP=2 equals TP=1; interrupted and resumed runs repeat
the uninterrupted one exactly; a rewrite store replaces the rewriter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .distributed import run_ranks
from .judge_utils import build_demo_and_tokenizer
from .pretrain_utils import ROOT, run_module, scalars

MODEL = [
    "--device", "cpu", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176",
    "--num-attention-heads", "4", "--seq-length", "96", "--max-position-embeddings", "96",
    "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--transformer-impl", "local",
]  # fmt: skip


@pytest.fixture(scope="module")
def sip_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sip")
    demo, tokenizer = build_demo_and_tokenizer(root)
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input",
         str(demo / "corpus.jsonl"), "--output-prefix", str(root / "corpus"),
         "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
         tokenizer.tokenizer_model, "--append-eod", "--workers", "1"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    base = [
        *MODEL, "--tokenizer-type", "GPTSentencePieceTokenizer",
        "--tokenizer-model", tokenizer.tokenizer_model,
        "--data-path", str(root / "corpus_text_document"), "--split", "98,2,0",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
        "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--clip-grad", "1.0",
        "--seed", "1234", "--log-interval", "1", "--eval-iters", "0",
        "--sip-suffix-len", "12", "--sip-nll-weight", "0.1",
    ]  # fmt: skip
    rewriter = ["--rewriter-backend", "oracle", "--rewriter-oracle-data", str(demo)]
    # What the judged objectives (online_dpo, rf_nll) add; sft_rewrite refuses them.
    judged = [
        "--sip-num-rollouts", "3", "--sip-objectives", "quality,safety,factuality",
        "--judge-backend", "oracle", "--judge-oracle-data", str(demo),
    ]  # fmt: skip
    return root, [*base, *rewriter, *judged], base, rewriter


def _step_worker(flags: list, out: str) -> None:
    from megatron_sip.arguments import parse_args
    from megatron_sip.initialize import destroy_distributed, initialize_distributed
    from megatron_sip.train_sip import SIPJobConfig, build_job

    world = int(os.environ["WORLD_SIZE"])
    config = parse_args(flags, SIPJobConfig, world_size=world, exit_on_error=False)
    context = initialize_distributed(config.parallel, "cpu", config.training.seed)
    job = build_job(config, context)
    metrics = job.trainer.step(job.state).metrics
    job.state.iteration += 1
    job.trainer.save(config.checkpoint, job.state)
    selections = [
        [
            (s.selection.chosen.kind, s.selection.chosen.index) if s.selection.chosen else None,
            (s.selection.rejected.kind, s.selection.rejected.index)
            if s.selection.rejected
            else None,
            s.rollouts,
        ]
        for batch in job.trainer.last_scored
        for s in batch
    ]
    if context.rank == 0:
        Path(out).write_text(json.dumps({"metrics": metrics, "selections": selections}))
    destroy_distributed()


def _weights_worker(checkpoints: list, flags: list, out: str) -> None:
    from megatron_sip.arguments import parse_args
    from megatron_sip.data.tokenizers import build_tokenizer
    from megatron_sip.initialize import destroy_distributed, initialize_distributed
    from megatron_sip.models.checkpointing import load_checkpoint
    from megatron_sip.train_sip import SIPJobConfig, build_reference
    from megatron_sip.training.setup import setup_model_and_optimizer

    config = parse_args(flags, SIPJobConfig, world_size=1, exit_on_error=False)
    context = initialize_distributed(config.parallel, "cpu", 1)
    tokenizer = build_tokenizer(config.tokenizer)
    states = []
    for checkpoint in checkpoints:
        job = setup_model_and_optimizer(
            config.model, config.parallel, config.training, config.tokenizer,
            tokenizer.vocab_size, context,
        )  # fmt: skip
        reference, _ = build_reference(config, job)
        load_checkpoint(checkpoint, job.model_chunks, load_optim=False, load_rng=False,
                        extra_modules={"reference": reference})  # fmt: skip
        policy = {n: p.detach().clone() for n, p in job.model_chunks[0].module.named_parameters()}
        ref = {n: p.detach().clone() for n, p in reference.named_parameters()}
        states.append({"policy": policy, "reference": ref})
    torch.save(states, out)
    destroy_distributed()


LOSS_METRICS = ("sip/loss", "sip/dpo-loss", "sip/dpo-margin", "sip/original-nll", "sip/kl-rollouts")


@pytest.mark.slow
def test_sip_step_at_tp2_and_pp2_equals_tp1(sip_data):
    """From the same random init (a saved TP=1 model), one online-DPO step with rollouts, oracle
    judging, selection, reference scoring (fused log-prob path where the kernel is built) and an
    SGD update gives the same rollouts, pairs, losses and updated weights at TP=2 and PP=2 as at
    TP=1."""
    root, flags, *_ = sip_data
    init = root / "init"
    run_ranks(_step_worker, 1, [*flags, "--train-iters", "1", "--lr", "0", "--save", str(init)],
              str(root / "init.json"))  # fmt: skip
    runs = {}
    for name, world, layout in (
        ("tp1", 1, []),
        ("tp2", 2, ["--tensor-model-parallel-size", "2"]),
        ("pp2", 2, ["--pipeline-model-parallel-size", "2"]),
    ):
        out = root / f"{name}.json"
        run_ranks(
            _step_worker, world,
            # SGD: the update is linear in the gradient (Adam's normalisation would blow the
            # float noise of a near-zero gradient up to a full step).
            [*flags, *layout, "--train-iters", "1", "--pretrained-checkpoint", str(init),
             "--optimizer", "sgd", "--lr", "0.1", "--save", str(root / name)],
            str(out),
        )  # fmt: skip
        runs[name] = json.loads(out.read_text())
    base = runs["tp1"]
    assert base["metrics"]["sip/pairs"] > 0
    for name in ("tp2", "pp2"):
        assert runs[name]["selections"] == base["selections"], name
        for metric in LOSS_METRICS:
            assert runs[name]["metrics"][metric] == pytest.approx(
                base["metrics"][metric], abs=2e-5
            ), (name, metric)
        for metric, value in base["metrics"].items():
            if metric.startswith(("sip/reward", "sip/chosen-share", "sip/skipped")):
                assert runs[name]["metrics"][metric] == pytest.approx(value), (name, metric)
    out = root / "weights.pt"
    checkpoints = [str(root / n) for n in ("init", "tp1", "tp2", "pp2")]
    run_ranks(_weights_worker, 1, checkpoints, [*flags, "--train-iters", "1"], str(out))
    initial, tp1, *others = torch.load(out)
    for other in others:
        for side in ("policy", "reference"):
            for key, value in tp1[side].items():
                torch.testing.assert_close(other[side][key], value, atol=2e-5, rtol=0)
    # The step moved the weights (the comparison is not between untouched copies).
    assert any(not torch.equal(initial["policy"][k], v) for k, v in tp1["policy"].items())


DETERMINISTIC = ("sip/", "learning-rate", "grad-norm")
TIMING = ("sip/time/", "sip/tokens-per-second/")


@pytest.mark.slow
def test_resumed_sip_run_repeats_the_uninterrupted_one(sip_data):
    """DP=2: a run stopped by --exit-interval 2 and resumed from its checkpoint (policy,
    optimizer, schedule, RNG, EMA reference, score store, data position) logs exactly the
    metrics of an uninterrupted 4-step run."""
    root, flags, *_ = sip_data
    common = [*flags, "--train-iters", "4", "--sip-ref-ema-decay", "0.5"]
    straight, resumed = root / "straight", root / "resumed"
    run_module(2, "megatron_sip.train_sip", *common, "--save", str(straight),
               "--tensorboard-dir", str(straight / "tb"))  # fmt: skip
    first = run_module(2, "megatron_sip.train_sip", *common, "--save", str(resumed),
                       "--load", str(resumed), "--exit-interval", "2",
                       "--tensorboard-dir", str(resumed / "tb1"))  # fmt: skip
    assert "exiting at iteration 2" in first
    second = run_module(
        2, "megatron_sip.train_sip", *common, "--save", str(resumed), "--load", str(resumed),
        "--tensorboard-dir", str(resumed / "tb2"),
    )  # fmt: skip
    assert "resuming SIP from" in second
    tags = [
        tag for tag in _tags(straight / "tb")
        if tag.startswith(DETERMINISTIC) and not tag.startswith(TIMING)
    ]  # fmt: skip
    assert "sip/dpo-margin" in tags and "sip/reward/rollout-mean" in tags
    for tag in tags:
        expected = scalars(straight / "tb", tag)
        got = {**scalars(resumed / "tb1", tag), **scalars(resumed / "tb2", tag)}
        assert got == expected, tag


def _tags(directory: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return accumulator.Tags()["scalars"]


@pytest.mark.slow
def test_rewrite_store_replaces_the_rewriter(sip_data):
    """tools/precompute_rewrites.py over the run's samples, then training from the store: the
    same rewrites, rewards and losses as running the rewriter online."""
    root, _, base, rewriter = sip_data
    common = [*base, "--train-iters", "2", "--sip-loss", "sft_rewrite"]
    store = root / "rewrites.jsonl"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "precompute_rewrites.py"), *common, *rewriter,
         "--rewrite-store-output", str(store)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    online, stored = root / "online_tb", root / "stored_tb"
    run_module(1, "megatron_sip.train_sip", *common, *rewriter, "--tensorboard-dir", str(online))
    run_module(1, "megatron_sip.train_sip", *common, "--rewriter-store", str(store),
               "--tensorboard-dir", str(stored))  # fmt: skip
    for tag in ("sip/loss", "sip/chosen-nll", "sip/missing-rewrites"):
        assert scalars(stored, tag) == scalars(online, tag), tag
    # A store made for other sample settings is refused, naming the setting.
    from megatron_sip.roles.rewrite_store import RewriteStore

    with pytest.raises(ValueError, match="sip_suffix_len=12, this run has 8"):
        RewriteStore.load(store).check_identity({"sip_suffix_len": 8}, str(store))


def test_rewrite_store_errors_name_the_line(tmp_path):
    from megatron_sip.roles.rewrite_store import RewriteStore, write_rewrite_store

    path = tmp_path / "store.jsonl"
    write_rewrite_store(path, {"seed": 1}, [((0, 1, 2), "clean text"), ((0, 3, 4), None)])
    store = RewriteStore.load(path)
    assert store.get((0, 1, 2)) == "clean text" and store.get((0, 3, 4)) is None
    assert (0, 3, 4) in store and (9, 9, 9) not in store and len(store) == 2
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1], '{"key": [0, 1], "rewrite": "x"}']))
    with pytest.raises(ValueError, match=r"store.jsonl:3: 'key'"):
        RewriteStore.load(path)
    path.write_text("\n".join([lines[0], "{not json"]))
    with pytest.raises(ValueError, match=r"store.jsonl:2: not JSON"):
        RewriteStore.load(path)
    path.write_text('{"rewrite": "x"}\n')
    with pytest.raises(ValueError, match=r"store.jsonl:1: not a rewrite store header"):
        RewriteStore.load(path)
    with pytest.raises(ValueError, match="seed=1, this run has 2"):
        store.check_identity({"seed": 2}, "store.jsonl")


def _skipped_update_worker(flags: list) -> None:
    from megatron_sip.arguments import parse_args
    from megatron_sip.initialize import destroy_distributed, initialize_distributed
    from megatron_sip.train_sip import SIPJobConfig, build_job

    config = parse_args(flags, SIPJobConfig, world_size=1, exit_on_error=False)
    context = initialize_distributed(config.parallel, "cpu", config.training.seed)
    trainer = build_job(config, context).trainer
    reference = [p.detach().clone() for p in trainer.reference.shadow.parameters()]
    policy = [p.detach().clone() for p in trainer.job.model_chunks[0].parameters()]
    # The optimizer finds an overflow (as Megatron's grad scaler does) and skips the update.
    trainer.job.optimizer.step = lambda: (False, None, None)
    state = build_job(config, context).state
    output = trainer.step(state)
    assert not output.update_successful
    assert all(torch.equal(a, b) for a, b in zip(policy, trainer.job.model_chunks[0].parameters()))
    # The reference is not moved toward weights that did not change, on an interval step.
    assert all(torch.equal(a, b) for a, b in zip(reference, trainer.reference.shadow.parameters()))
    destroy_distributed()


@pytest.mark.slow
def test_skipped_optimizer_step_moves_no_reference(sip_data):
    _, flags, *_ = sip_data
    run_ranks(_skipped_update_worker, 1, [*flags, "--train-iters", "1", "--lr", "0.1",
                                          "--sip-ref-ema-decay", "0.5"])  # fmt: skip


def _train_sip(flags: list, timeout: int = 300) -> tuple[int, str]:
    """(exit code, output) of a one-rank SIP run under torchrun."""
    from .distributed import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "megatron_sip.train_sip", *flags]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
def test_a_judge_that_cannot_judge_stops_the_run(sip_data, tmp_path):
    """Nothing listening on the judge's port: the start-up self-check stops the run before any
    step, naming the cause. A judge that answers the self-check and then fails every request:
    the run saves a checkpoint and stops with an error after the step, instead of training on
    nothing."""
    from .fake_vllm import FakeAnswer, FakeVLLM, Fault

    root, flags, _, _ = sip_data
    oracle_judge = flags.index("--judge-backend")
    flags = flags[:oracle_judge] + flags[oracle_judge + 4 :]  # drop the oracle judge
    served = ["--judge-backend", "openai", "--judge-model", "judge", "--judge-max-retries", "0",
              "--judge-timeout", "5", "--judge-min-calibration-accuracy", "0",
              "--train-iters", "4", "--save", str(tmp_path / "ckpt"), "--save-interval", "100",
              "--sip-missing-scores-window", "2"]  # fmt: skip
    code, output = _train_sip([*flags, *served, "--judge-url", "http://127.0.0.1:9"])
    assert code == 1, output[-3000:]
    assert "judge self-check: 3 of 3 calibration tasks from placeholder prompts got no score" in (
        output
    ), output[-3000:]
    assert "connection" in output and not (tmp_path / "ckpt").exists()

    verdicts = {"[[A]]": -0.4, "[[B]]": -1.1, "[[SAFE]]": -0.2, "[[UNSAFE]]": -1.7,
                "[[YES]]": -0.3, "[[NO]]": -1.4}  # fmt: skip

    # The self-check's placeholder prompts take 4 requests (safety, factuality, both orders of a
    # pairwise task); every later request fails.
    def fail_after_self_check(index, request):
        return Fault.internal_error() if index >= 4 else None

    with FakeVLLM(model="judge", answer=lambda p, b: FakeAnswer("[[A]]", dict(verdicts)),
                  faults=fail_after_self_check) as server:  # fmt: skip
        code, output = _train_sip([*flags, *served, "--judge-url", server.url])
    assert code == 1, output[-3000:]
    assert "judge self-check passed: 3 tasks from placeholder prompts" in output
    assert "stopping at iteration 1" in output, output[-3000:]
    assert "scores asked of the judge in the last 1 steps are missing" in output
    assert "http_500" in output, output[-3000:]  # what the client counted
    tracker = tmp_path / "ckpt" / "latest_checkpointed_iteration.txt"
    assert tracker.read_text().strip() == "1"


def test_missing_guard_reads_shares_over_its_window():
    from megatron_sip.training.sip.trainer import MissingGuard

    def step(missing, asked, missing_rewrites=0.0, prefixes=4.0):
        return {"sip/judge-scores-missing": missing, "sip/judge-scores-asked": asked,
                "sip/missing-rewrites": missing_rewrites, "sip/prefixes": prefixes}  # fmt: skip

    guard = MissingGuard(0.1, 0.5, window=3, describe=lambda: "client stats")
    assert guard.update(step(1, 10)) is None  # 10%, window not full yet
    assert guard.update(step(5, 10)) is None  # 50% in one step, judged over the full window
    reason = guard.update(step(1, 10))  # 7 of 30 over the window
    assert reason.startswith("7 of the 30 scores asked of the judge in the last 3 steps are")
    assert reason.endswith("the judge is not judging: client stats")
    assert MissingGuard(0.1, 0.5, window=3).update(step(0, 10)) is None
    everything = MissingGuard(0.1, 0.5, window=3).update(step(10, 10))  # nothing judged at all
    assert everything.startswith("10 of the 10 scores asked")
    rewrites = MissingGuard(1.0, 0.5, window=3).update(step(0, 10, 4, 4))
    assert "4 of 4 rewrites in the last 1 steps are missing" in rewrites
    assert MissingGuard(1.0, None, window=1).update(step(0, 10, 4, 4)) is None  # a rewrite store
