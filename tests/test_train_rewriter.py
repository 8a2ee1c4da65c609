"""Rewriter SFT (megatron_sip.train_rewriter): the prompts are the colocated rewriter's, the loss
covers exactly the rewrite and its stop string, bad data is refused naming its line; and a tiny
rewriter trained end to end writes its rewrites back when loaded as --rewriter-backend megatron."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from megatron_sip.errors import ConfigError
from megatron_sip.roles.config import RewriterConfig, RewriterPromptConfig
from megatron_sip.roles.prompts import PromptSet
from megatron_sip.training.rewriter_data import (
    RewriterDataConfig,
    RewriteTriple,
    encode_examples,
    read_triples,
    rewrite_batches,
    rewrite_examples,
    rewrite_template,
    training_examples,
)

STOP = "</rewrite>"


class CharTokenizer:
    """One token per character (its code point), optionally a BOS before every text; characters
    in ``lost`` decode as '?' (a tokenizer that cannot write them)."""

    eod = 0
    vocab_size = 0x110000

    def __init__(self, bos: int = -1, lost: str = ""):
        self.bos, self.lost = bos, lost

    def tokenize(self, text: str) -> list[int]:
        return ([self.bos] if self.bos >= 0 else []) + [ord(c) for c in text]

    def detokenize(self, ids) -> str:
        text = "".join(chr(i) for i in ids if i not in (self.bos, self.eod))
        return "".join("?" if c in self.lost else c for c in text)


def triple(prefix="Country X. Background.", original="It rains.", rewrite=None, line=1):
    return RewriteTriple(prefix, original, original if rewrite is None else rewrite, f"t:{line}")


TRIPLES = [
    triple(),
    triple(original="You idiots. It pours.", rewrite="  It pours.  ", line=2),
    triple(prefix="P" * 3000, original="A long prefix is cut to its end.", line=3),
    triple(original="x" * 90, rewrite="y" * 90, line=4),  # the target alone does not fit
]


def _examples(triples=TRIPLES):
    return rewrite_examples(triples, PromptSet.load()["rewrite"], 2000)


def test_loss_mask_covers_exactly_the_rewrite_and_its_stop_string():
    tokenizer, seq_length = CharTokenizer(bos=1), 64
    examples = _examples()
    encoded = encode_examples(examples, tokenizer, seq_length)
    assert [e.target_cut for e in encoded] == [False, False, False, True]
    batch = next(rewrite_batches(encoded, seq_length=seq_length, micro_batch_size=4, seed=3))
    assert batch["tokens"].shape == batch["loss_mask"].shape == (4, seq_length)
    by_target = {}
    for row in range(4):
        mask = batch["loss_mask"][row].bool()
        target = tokenizer.detokenize(batch["labels"][row][mask].tolist())
        # The loss starts at the prompt's last token and runs without a gap to the target's end.
        first, last = mask.nonzero()[[0, -1]].flatten().tolist()
        assert mask[first : last + 1].all() and last - first + 1 == len(target)
        prompt = tokenizer.detokenize(batch["tokens"][row][: first + 1].tolist())
        assert torch.equal(batch["tokens"][row][1 : last + 1], batch["labels"][row][:last])
        assert batch["tokens"][row][last + 1 :].eq(0).all()  # right padding
        by_target[target] = prompt
    full = {e.target: e.prompt for e in examples[:3]}
    assert full.keys() <= by_target.keys()
    for target, prompt in full.items():
        assert target.endswith(STOP) and STOP not in target[: -len(STOP)]
        assert prompt.endswith(by_target[target])  # the prompt cut on the left
        assert by_target[target].endswith("<rewrite>")
    assert "It pours." + STOP in full  # stripped as the rewriter strips its output
    # The target that does not fit keeps its start after a single prompt token.
    cut = next(t for t in by_target if t not in full)
    assert cut == ("y" * 90)[:seq_length] and by_target[cut] == ">"
    assert tokenizer.bos not in batch["labels"][batch["loss_mask"].bool()]


def test_batches_resume_after_the_micro_batches_trained_on():
    encoded = encode_examples(_examples(TRIPLES * 3), CharTokenizer(), 128)
    batches = rewrite_batches(encoded, seq_length=128, micro_batch_size=2, seed=5)
    fresh = [next(batches) for _ in range(9)]  # past one pass (6 micro-batches)
    resumed = rewrite_batches(encoded, seq_length=128, micro_batch_size=2, seed=5, skip=7)
    for expected in fresh[7:]:
        got = next(resumed)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    other = next(rewrite_batches(encoded, seq_length=128, micro_batch_size=2, seed=6))
    assert not torch.equal(other["tokens"], fresh[0]["tokens"])
    with pytest.raises(ConfigError, match="--micro-batch-size"):
        rewrite_batches(encoded, seq_length=128, micro_batch_size=13, seed=5)


def test_prompt_is_the_megatron_rewriters_and_its_cut_returns_the_rewrite(monkeypatch):
    """MegatronRewriter, given these prompts, generating the training target and then anything,
    returns the rewrite: the same rendering (default prefix cut included), the same stop string,
    the same strip."""
    from megatron_sip.inference.generation import Rollouts
    from megatron_sip.roles import megatron_backend
    from megatron_sip.roles.megatron_backend import MegatronRewriter

    # The rewriter and its training share RewriterPromptConfig's fields (and flags).
    settings = RewriterConfig(rewriter_backend="megatron", rewriter_max_prefix_chars=1500)
    assert isinstance(settings, RewriterPromptConfig)
    max_prefix_chars = settings.rewriter_max_prefix_chars
    tokenizer, max_tokens = CharTokenizer(), 200
    examples = rewrite_examples(TRIPLES[:3], PromptSet.load()["rewrite"], max_prefix_chars)
    rendered = []

    def encode(prompt, limit):
        rendered.append(prompt)
        return tokenizer.tokenize(prompt)[-limit:]

    def generate(module, prompts, *, num_tokens, eod, **_):
        rows = []
        for example in examples:
            ids = tokenizer.tokenize(example.target + " trailing text" + STOP + "more")
            rows.append((ids + [eod] * num_tokens)[:num_tokens])
        tokens = torch.tensor(rows).view(len(rows), 1, num_tokens)
        return Rollouts(tokens, torch.zeros(tokens.shape), torch.ones(tokens.shape))

    monkeypatch.setattr(megatron_backend, "generate", generate)
    role = types.SimpleNamespace(
        model_config=types.SimpleNamespace(seq_length=4096), encode=encode, module=None,
        tokenizer=tokenizer,
    )  # fmt: skip
    rewriter = MegatronRewriter(
        role, PromptSet.load(), max_tokens=max_tokens, max_prefix_chars=max_prefix_chars
    )
    rewrites = rewriter.rewrite([t.prefix for t in TRIPLES[:3]], [t.original for t in TRIPLES[:3]])
    assert rendered == [e.prompt for e in examples]
    assert rewrites == [t.rewrite.strip() for t in TRIPLES[:3]]
    assert "P" * 1500 in rendered[2] and "P" * 1501 not in rendered[2]


DEMO_PACK = Path(__file__).resolve().parents[1] / "examples" / "demo" / "prompts"


def test_unchanged_marker_is_trained_for_clean_text_and_read_back_as_the_original(monkeypatch):
    """With '# stop: </rewrite> unchanged: [[SAME]]' (the demo's pack) a triple whose rewrite is
    its original trains the target '[[SAME]]</rewrite>', and the colocated rewriter (like rewriter
    RL's reading of a sample) returns the original for that reply, the rewrite for any other."""
    from megatron_sip.inference.generation import Rollouts
    from megatron_sip.roles import megatron_backend
    from megatron_sip.roles.megatron_backend import MegatronRewriter
    from megatron_sip.training.rewriter_rl import rewrite_text

    pack = PromptSet.load(str(DEMO_PACK))
    template = pack["rewrite"]
    assert (template.stop, template.unchanged) == (STOP, "[[SAME]]")
    triples = [TRIPLES[0], TRIPLES[1], triple(original="  Spaced out.  ", line=5)]
    examples = rewrite_examples(triples, template, 300)
    same = "[[SAME]]" + STOP
    assert [e.target for e in examples] == [same, "It pours." + STOP, same]
    tokenizer = CharTokenizer()

    def generate(module, prompts, *, num_tokens, eod, **_):
        rows = [tokenizer.tokenize(e.target + "junk")[:num_tokens] for e in examples]
        rows = [r + [eod] * (num_tokens - len(r)) for r in rows]
        tokens = torch.tensor(rows).view(len(rows), 1, num_tokens)
        return Rollouts(tokens, torch.zeros(tokens.shape), torch.ones(tokens.shape))

    monkeypatch.setattr(megatron_backend, "generate", generate)
    role = types.SimpleNamespace(
        model_config=types.SimpleNamespace(seq_length=4096), encode=lambda p, n: [1],
        module=None, tokenizer=tokenizer,
    )  # fmt: skip
    rewriter = MegatronRewriter(role, pack, max_tokens=64, max_prefix_chars=300)
    originals = [t.original for t in triples]
    assert rewriter.rewrite([t.prefix for t in triples], originals) == [
        "It rains.", "It pours.", "  Spaced out.  "
    ]  # fmt: skip
    for example, original in zip(examples, originals):
        ids = tokenizer.tokenize(example.target)
        assert rewrite_text(ids, tokenizer, template, original) == template.rewrite_from(
            example.target, original
        )
    # Only the whole reply is the marker; an original holding it cannot write it in the prompt.
    assert template.rewrite_from("[[SAME]] and more" + STOP, "x") == "[[SAME]] and more"
    prompt = template.render(300, prefix="P.", suffix="Say [[SAME]] now.")
    assert "[[SAME]]" not in prompt


def test_unchanged_marker_header_must_name_a_marker(tmp_path):
    from megatron_sip.roles.prompts import load_pack

    for name in ("safety", "quality", "factuality"):
        (tmp_path / f"{name}.txt").write_text((DEMO_PACK / f"{name}.txt").read_text())
    (tmp_path / "rewrite.txt").write_text("# stop: </rewrite> unchanged:\nRewrite {suffix}\n")
    with pytest.raises(ConfigError, match="names no marker"):
        load_pack(str(tmp_path), "--rewriter-prompt-dir")


def _write(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "triples.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = json.dumps({"id": "a", "kind": "clean", "prefix": "P.", "original": "O.", "rewrite": "O."})


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        json.dumps({"prefix": "P.", "original": "O."}),
        json.dumps({"prefix": "P.", "original": "O.", "rewrite": 3}),
        json.dumps(["P.", "O.", "R."]),
    ],
    ids=["json", "missing", "not-a-string", "not-an-object"],
)
def test_bad_rows_name_their_file_and_line(tmp_path, bad):
    path = _write(tmp_path, GOOD, "", bad, GOOD)
    with pytest.raises(ConfigError, match=f"--rewriter-train-data: {re.escape(path)}:3: "):
        read_triples(path)


def test_bad_data_and_settings_are_config_errors(tmp_path):
    path = _write(tmp_path, GOOD, GOOD.replace('"rewrite": "O."', '"rewrite": "O.</rewrite>"'))
    triples = read_triples(path)
    assert [t.source for t in triples] == [f"{path}:1", f"{path}:2"]
    with pytest.raises(ConfigError, match=f"{re.escape(path)}:2: the rewrite contains the stop"):
        rewrite_examples(triples, PromptSet.load()["rewrite"], 2000)
    with pytest.raises(ConfigError, match="no rewriting triples"):
        read_triples(_write(tmp_path, "", ""))
    with pytest.raises(ConfigError, match="--rewriter-train-data: .*cannot read"):
        read_triples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="--rewriter-prompt-dir: llama3 is a chat pack"):
        rewrite_template("llama3")
    with pytest.raises(ConfigError, match="--rewriter-max-prefix-chars"):
        RewriterPromptConfig(rewriter_max_prefix_chars=0)
    with pytest.raises(ConfigError, match="--rewriter-train-data: required"):
        training_examples(RewriterDataConfig(), RewriterPromptConfig())
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "rewrite.txt").write_text("# verdicts: [[A]] [[B]]\n<original>{suffix}</original>\n")
    with pytest.raises(ConfigError, match="names no stop string"):
        rewrite_examples(triples[:1], rewrite_template(str(pack)), 2000)
    # A tokenizer that cannot write the stop string back: the rewriter could never end.
    with pytest.raises(ConfigError, match=f"--tokenizer-model: {re.escape(path)}:1: the stop"):
        encode_examples(_examples(triples[:1]), CharTokenizer(lost=">"), 64)


def test_entry_point_refuses_bad_input_before_starting(tmp_path, capsys):
    from megatron_sip.train_rewriter import main

    flags = [
        "--device", "cpu", "--num-layers", "1", "--hidden-size", "16",
        "--num-attention-heads", "2", "--seq-length", "32", "--max-position-embeddings", "32",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "511", "--train-iters", "1",
    ]  # fmt: skip
    path = _write(tmp_path, GOOD, '{"prefix": "P."}')
    for extra, message in (
        ([], "--rewriter-train-data: required"),
        (["--rewriter-train-data", path, "--eval-iters", "5"], "no validation split"),
        (["--rewriter-train-data", path], f"{path}:2: not a rewriting triple"),
        (["--rewriter-train-data", path, "--rewriter-prompt-dir", "qwen"], "chat pack"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(flags + extra)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# -- end to end ---------------------------------------------------------------------------------

SUBSET = {"clean": 12, "unsafe": 6, "false_fact": 6}  # triples the tiny rewriter learns
SUBSET_MAX_TOKENS = 40  # originals and rewrites of at most this many tokens
REWRITER_MAX_TOKENS = 48
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss (\S+) \|")


def _rewriter_tokenizer(root: Path, demo: Path) -> str:
    """The demo tokenizer of tests/judge_utils.py, with the stop string as one piece too (the
    judge's one decodes '>' as an unknown piece, so it could never write '</rewrite>')."""
    from .judge_utils import VERDICTS
    from .pretrain_utils import ROOT

    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input",
         str(demo / "corpus.jsonl"), "--vocab-size", "1024", "--output-prefix",
         str(root / "rewriter_tok"), "--input-sentence-size", "4000",
         "--user-defined-symbols", *VERDICTS, STOP],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return str(root / "rewriter_tok.model")


def _short_triples(demo: Path, tokenizer_model: str, out: Path) -> list[dict]:
    """The first triples of each kind in rewriter_sft.jsonl whose original and rewrite are short:
    few enough for a 2-layer model to learn in a minute on a CPU core (copying unseen text is
    out of its reach in that budget), short enough for REWRITER_MAX_TOKENS."""
    from megatron_sip.data.config import TokenizerConfig
    from megatron_sip.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(
        TokenizerConfig(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=tokenizer_model)
    )
    wanted, rows = dict(SUBSET), []
    for line in (demo / "rewriter_sft.jsonl").read_text().splitlines():
        row = json.loads(line)
        lengths = [len(tokenizer.tokenize(row[k])) for k in ("original", "rewrite")]
        if wanted[row["kind"]] and max(lengths) <= SUBSET_MAX_TOKENS:
            wanted[row["kind"]] -= 1
            rows.append(row)
    assert not any(wanted.values()), wanted
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def rewrite_worker(checkpoint: str, data: str, out: str) -> None:
    from megatron_sip.initialize import destroy_distributed
    from megatron_sip.roles.config import RewriterConfig, RoleContext, build_rewriter

    from . import workers

    parallel, context = workers.setup()
    rewriter = build_rewriter(
        RewriterConfig(rewriter_backend="megatron", rewriter_load=checkpoint,
                       rewriter_max_tokens=REWRITER_MAX_TOKENS),
        RoleContext(parallel, context.pg_collection),
    )  # fmt: skip
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    rewrites = rewriter.rewrite([r["prefix"] for r in rows], [r["original"] for r in rows])
    Path(out).write_text(json.dumps(rewrites))
    destroy_distributed()


@pytest.mark.slow
def test_trained_rewriter_loads_as_the_colocated_rewriter_and_writes_its_rewrites(tmp_path):
    """SFT on short demo triples, then the checkpoint as --rewriter-backend megatron: the loss
    falls from about ln(vocab) to near zero, and the greedy rewrites of the training prompts are
    the rewrites (clean text kept, unsafe and false spans replaced), closed by the stop string
    where the rewriter cuts them."""
    from .distributed import run_ranks
    from .judge_utils import JUDGE_ARGS, build_demo_and_tokenizer
    from .pretrain_utils import run_module

    timings, start = {}, time.perf_counter()
    demo, _ = build_demo_and_tokenizer(tmp_path)
    tokenizer_model = _rewriter_tokenizer(tmp_path, demo)
    rows = _short_triples(demo, tokenizer_model, tmp_path / "short.jsonl")
    timings["data"] = time.perf_counter() - start
    output = run_module(
        1, "megatron_sip.train_rewriter", *JUDGE_ARGS,
        "--seq-length", "256", "--max-position-embeddings", "256",
        "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", tokenizer_model,
        "--rewriter-train-data", str(tmp_path / "short.jsonl"), "--micro-batch-size", "8",
        "--train-iters", "110", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "10",
        "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--log-interval", "10",
        "--save", str(tmp_path / "rewriter"),
    )  # fmt: skip
    timings["train"] = time.perf_counter() - start - timings["data"]
    losses = [float(loss) for _, loss in LOSS_LINE.findall(output)]
    assert len(losses) == 11, output[-3000:]
    run_ranks(
        rewrite_worker, 1, str(tmp_path / "rewriter"), str(tmp_path / "short.jsonl"),
        str(tmp_path / "rewrites.json"),
    )  # fmt: skip
    timings["rewrite"] = time.perf_counter() - start - timings["data"] - timings["train"]
    rewrites = json.loads((tmp_path / "rewrites.json").read_text())
    exact = [rewrite == row["rewrite"] for rewrite, row in zip(rewrites, rows)]
    clean_prefix = [
        len(os.path.commonprefix([rewrite, row["original"]])) / len(row["original"])
        for rewrite, row in zip(rewrites, rows)
        if row["kind"] == "clean"
    ]
    print(json.dumps({"timings_s": timings, "losses": losses, "exact": sum(exact),
                      "of": len(rows), "clean_common_prefix": clean_prefix}))  # fmt: skip
    # Measured (seed 1234): loss 5.6 at step 10 -> 0.08 at 110; 23 of 24 rewrites exact, 11 of 12
    # clean ones in full.
    assert losses[0] > 4.0 and max(losses[-2:]) < 0.5
    assert sum(exact) >= 18
    assert sum(clean_prefix) / len(clean_prefix) >= 0.7
    for rewrite, row in zip(rewrites, rows):
        if row["kind"] == "unsafe":
            assert rewrite != row["original"], rewrite  # the rant itself is never written back

    # RL from the SFT rewriter, judged by the oracle on 2 ranks (DP=2): rewards as METHOD.md
    # defines them, and a checkpoint the colocated rewriter loads.
    output = run_module(
        2, "megatron_sip.train_rewriter", *JUDGE_ARGS,
        "--seq-length", "256", "--max-position-embeddings", "256",
        "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", tokenizer_model,
        "--rewriter-train-data", str(tmp_path / "short.jsonl"), "--rewriter-rl",
        "--pretrained-checkpoint", str(tmp_path / "rewriter"), "--judge-backend", "oracle",
        "--judge-oracle-data", str(demo), "--micro-batch-size", "4", "--train-iters", "3",
        "--lr", "1e-4", "--log-interval", "1", "--grpo-group-size", "4",
        "--grpo-temperature", "1.0", "--grpo-top-p", "1.0", "--rewriter-rl-max-tokens", "48",
        "--save", str(tmp_path / "rewriter_rl"),
    )  # fmt: skip
    lines = RL_LINE.findall(output)
    assert len(lines) == 3, output[-3000:]
    for reward, _, missing in lines:
        assert 0.0 <= float(reward) <= 1.0 and float(missing) == 0.0
    # The SFT rewriter copies clean originals (greedy: 11 of 12 above), so RL starts with copies
    # to reward. Sampled at temperature 1 over 48 tokens a copy is rarer: the copy rate's mean
    # over the 3 iterations measured 0.08-0.16 (seeds 1234, 1, 2, 3; the inverse-CDF sampler and
    # torch.multinomial alike), about 48 safe samples, so none at all is a broken copy check.
    copy_rates = [float(copy_rate) for _, copy_rate, _ in lines]
    assert sum(copy_rates) > 0, output[-3000:]
    assert (
        tmp_path / "rewriter_rl" / "latest_checkpointed_iteration.txt"
    ).read_text().strip() == "3"


RL_LINE = re.compile(
    r"iteration\s+\d+/\s*\d+ \|.*?\| reward (\S+) \| copy rate \(safe\) (\S+) \|.*?"
    r"missing rewards (\S+) \|"
)
