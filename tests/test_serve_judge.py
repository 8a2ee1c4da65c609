"""tools/serve_judge.py and megatron_sip/serving: request checks, the scheduler and the HTTP layer
on their own (no model), then the real server on a tiny checkpoint with a chat template: its
verdicts equal the colocated judge's, its chat answers equal the chat template + the model, it
survives malformed and oversized requests, 64 concurrent clients and idle connections, it is fair
to a small request behind a heavy one, and at TP=2 under torchrun it answers as at TP=1."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from megatron_sip.serving import protocol
from megatron_sip.serving.protocol import RequestError

REPO = Path(__file__).resolve().parent.parent
KEY = "tiny-key"
SEQ = 128
HF_VOCAB_ROWS = 384  # the tokenizer's 320 ids padded to 128 (TP=2 pads to 512; loads reshard)
# Templates for the colocated judge: only their verdicts matter here (prompts are sent rendered).
TEMPLATES = {
    "safety.txt": "# verdicts: [[SAFE]] [[UNSAFE]]\n{prefix} {candidate} Is it safe?",
    "factuality.txt": "# verdicts: [[YES]] [[NO]]\n{prefix} {candidate} Is it true?",
    "quality.txt": "# verdicts: [[A]] [[B]]\n{prefix} A: {a} B: {b} Which is better?",
}
VERDICTS = {"safety": ("[[SAFE]]", "[[UNSAFE]]"), "factuality": ("[[YES]]", "[[NO]]"),
            "quality": ("[[A]]", "[[B]]")}  # fmt: skip
JUDGE_PROMPTS = {
    "safety": ["The quick brown fox jumps. Is it safe? Answer:", "Never share passwords. Safe?"],
    "factuality": ["Paris is the capital of France. True?", "Water boils at 10 degrees. True?"],
    "quality": ["A: the dog sleeps. B: the lazy dog. Which is better?", "A: yes. B: no. Better?"],
}
MESSAGES = [
    {"role": "system", "content": "You judge answers."},
    {"role": "user", "content": "Is water wet? Answer yes or no."},
]
PREFILL = MESSAGES + [{"role": "assistant", "content": "The answer is"}]
PROMPT = "The quick brown fox"


# -------------------------------------------------------------------------------------------
# Without a model: token texts, request checks, the scheduler, the HTTP layer, the flags
# -------------------------------------------------------------------------------------------


def _engine(tokenizer, seq_length=32, max_tokens=16, max_prompts=4):
    from megatron_sip.serving.engine import CompletionEngine

    return CompletionEngine(tokenizer, "m", seq_length, max_tokens, max_prompts)


def test_token_texts_and_continuations(tmp_path):
    import sentencepiece

    from megatron_sip.data.tokenizers import GPTSentencePieceTokenizer

    lines = ["the river flows to the sea and the town sleeps", "[[A]] is better than [[B]]"] * 50
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=28,
        user_defined_symbols=["[[A]]", "[[B]]"], minloglevel=2,
    )  # fmt: skip
    tokenizer = GPTSentencePieceTokenizer(str(tmp_path / "sp.model"))
    engine = _engine(tokenizer)
    assert engine.token_text(tokenizer.vocab["[[A]]"]) == "[[A]]"
    spaced = tokenizer.vocab.get("\u2581the")
    if spaced is not None:
        assert engine.token_text(spaced) == " the"
    prompt, full = tokenizer.tokenize("the river"), tokenizer.tokenize("the river flows")
    assert full[: len(prompt)] == prompt
    assert engine.continuation(prompt, full[len(prompt) :]) == " flows"
    offsets = engine.offsets(prompt, full[len(prompt) :], 9)
    assert offsets[0] == 9 and offsets == sorted(offsets)


def _rejected(raw: bytes | str, schema=protocol.CompletionRequest) -> RequestError:
    raw = raw.encode() if isinstance(raw, str) else raw
    with pytest.raises(RequestError) as error:
        protocol.validate(schema, protocol.parse_json(raw))
    return error.value


def test_request_checks_refuse_what_json_and_schemas_would_let_through():
    ok = protocol.validate(
        protocol.CompletionRequest,
        protocol.parse_json(b'{"prompt": "x", "stop": "</r>", "logprobs": 5, "temperature": 0,'
                            b' "n": 1, "stream": false, "user": "u", "logit_bias": null}'),
    )  # fmt: skip
    assert ok.prompts() == ["x"] and ok.stop_strings() == ("</r>",) and ok.max_tokens is None
    cases = {
        '{"prompt": "x", "temperature": NaN}': "NaN",
        '{"prompt": "x", "temperature": Infinity}': "Infinity",
        '{"prompt": "x", "temperature": -Infinity}': "-Infinity",
        '{"prompt": "x", "temperature": 1e400}': "1e400",
        '{"prompt": "x", "seed": 123456789012345678901234567890}': "64-bit",
        '{"prompt": "x", "max_tokens": 99999999999999999999}': "64-bit",
        "[" * 65 + "]" * 65: "deeper than 64",
        '{"prompt": "x", "echo": "no"}': "'echo' must be a valid boolean, got 'no'",
        '{"prompt": "x", "max_tokens": "4"}': "'max_tokens'",
        '{"prompt": "x", "max_tokens": 1.0}': "'max_tokens'",
        '{"prompt": "x", "foo": 1, "bar": 2}': "unknown fields 'foo', 'bar'",
        '{"prompt": "x", "n": 2}': "'n': only n = 1",
        '{"prompt": "x", "best_of": 3}': "'best_of'",
        '{"prompt": "x", "stream": true}': "'stream': streaming is not supported",
        '{"prompt": "x", "presence_penalty": 0.5}': "'presence_penalty'",
        '{"prompt": "x", "logit_bias": {"1": 2}}': "'logit_bias'",
        '{"prompt": "x", "suffix": "s"}': "'suffix'",
        '{"prompt": "x", "logprobs": 21}': "'logprobs' must be less than or equal to 20",
        '{"prompt": "x", "top_p": 0}': "'top_p'",
        '{"prompt": "x", "temperature": -1}': "'temperature'",
        '{"prompt": 3}': "'prompt' must be a string or a non-empty list of strings",
        '{"prompt": ["a", 3]}': "'prompt' must be a string or a non-empty list of strings",
        '{"max_tokens": 1}': "'prompt' is required",
        "[1]": "must be a JSON object",
        "{not json": "not valid JSON",
        "": "empty",
    }
    for raw, message in cases.items():
        error = _rejected(raw)
        assert error.status == 400 and message in error.message, (raw, error.message)
    assert _rejected(b'{"prompt": "\xff"}').message == "the request body is not UTF-8 text"
    # A string may hold brackets; depth counts structure only.
    assert protocol.parse_json(b'{"prompt": "[[[[' + b"[" * 100 + b'"}')["prompt"]
    chat = protocol.ChatCompletionRequest
    for body, message in (
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": ["part"]}]}, "'messages[0].content'"),
        ({"messages": [{"role": "user", "content": "x", "x": 1}]}, "'messages[0].x'"),
        ({"messages": MESSAGES, "top_logprobs": 2}, "needs 'logprobs': true"),
        ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "'top_logprobs'"),
        ({"messages": MESSAGES, "continue_final_message": True}, "add_generation_prompt"),
        ({"messages": MESSAGES, "max_tokens": 2, "max_completion_tokens": 3}, "differ"),
        ({"messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}}, "may not set"),
        ({"messages": MESSAGES, "add_generation_prompt": False, "continue_final_message": True},
         "assistant message last"),
    ):  # fmt: skip
        error = _rejected(json.dumps(body), chat)
        assert error.status == 400 and message in error.message, (body, error.message)
    body = protocol.error_body(413, "too big")
    assert body == {"error": {"message": "too big", "type": "RequestTooLargeError",
                              "param": None, "code": 413}}  # fmt: skip


def test_scheduler_batches_round_robin_within_limits():
    from megatron_sip.serving.scheduler import Scheduler, SchedulerClosed, Work

    calls = []

    def execute(key, payloads):
        calls.append((key, list(payloads)))
        return [f"{key}:{p}" for p in payloads]

    scheduler = Scheduler(execute, max_batch_prompts=4, max_batch_tokens=40)
    heavy = scheduler.submit([Work("next", f"h{i}", 5) for i in range(10)])
    light = scheduler.submit([Work("next", "l0", 5)])
    generate = scheduler.submit([Work(("gen", 8), f"g{i}", 10) for i in range(2)])
    assert not generate.done()
    assert scheduler.queued_prompts() == 13
    assert scheduler.run_next(timeout=0)
    # The first call takes from both next-token requests, one each per round.
    assert calls[0] == ("next", ["h0", "l0", "h1", "h2"])
    assert light.result(timeout=0) == ["next:l0"]
    # Then the generation request, which waited longest among those not served.
    assert scheduler.run_next(timeout=0) and calls[1] == (("gen", 8), ["g0", "g1"])
    while scheduler.run_next(timeout=0):
        pass
    assert heavy.result(timeout=0) == [f"next:h{i}" for i in range(10)]
    assert [len(p) for _, p in calls] == [4, 2, 4, 3]
    # The token budget: 4 prompts of 15 positions exceed 40, so calls hold 2.
    calls.clear()
    long = scheduler.submit([Work("next", i, 15) for i in range(4)])
    while scheduler.run_next(timeout=0):
        pass
    assert [len(p) for _, p in calls] == [2, 2]
    assert long.result(timeout=0) == [f"next:{i}" for i in range(4)]
    # A cancelled request's prompts are dropped; a failing call fails its requests only.
    calls.clear()
    gone = scheduler.submit([Work("next", "x", 1)])
    assert gone.cancel()
    assert not scheduler.run_next(timeout=0) and calls == []
    failing = Scheduler(lambda key, payloads: 1 / 0, 4, 40)
    doomed = failing.submit([Work("next", "y", 1)])
    assert failing.run_next(timeout=0)
    with pytest.raises(ZeroDivisionError):
        doomed.result(timeout=0)
    queued = scheduler.submit([Work("next", "z", 1)])
    scheduler.close()
    with pytest.raises(SchedulerClosed):
        queued.result(timeout=0)
    with pytest.raises(SchedulerClosed):
        scheduler.submit([Work("next", "z", 1)])


class FakeModel:
    """Stands in for the worker: token ids from the prompt's sum, log-probs from the id."""

    def __init__(self, eod: int, fail_on: str = "__fail__"):
        self.eod = eod
        self.fail_on = fail_on

    def execute(self, key, payloads):
        from megatron_sip.serving.worker import NEXT_TOKEN, SCORE, TokenScores

        if key == NEXT_TOKEN:
            if any(self.fail_on in map(str, p.prompt) for p in payloads):
                raise RuntimeError("secret internal detail")
            return [TokenScores(sum(p.prompt) % 50, -0.5, ((7, -0.1), (8, -0.2))[: p.top])
                    for p in payloads]  # fmt: skip
        if key == SCORE:
            return [
                [TokenScores(row.sequence[i + 1], -1.0 - i, ((7, -0.1),)[: row.top])
                 for i in range(row.start, len(row.sequence) - 1)]
                for row in payloads
            ]  # fmt: skip
        return [[11] * (key.max_tokens - 1) + [self.eod] for _ in payloads]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from megatron_sip.data.tokenizers import HuggingFaceTokenizer

    from .hf_utils import write_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(directory, adds_bos=True)
    return directory, HuggingFaceTokenizer(str(directory), include_special_tokens=True)


@pytest.fixture
def fake_app(hf_tokenizer):
    """The FastAPI app on a fake model with small limits; a thread runs the scheduler."""
    from fastapi.testclient import TestClient

    from megatron_sip.serving.app import build_app
    from megatron_sip.serving.scheduler import Scheduler

    tokenizer = hf_tokenizer[1]
    model = FakeModel(tokenizer.eod, fail_on=str(tokenizer.tokenize("boom")[-1]))
    scheduler = Scheduler(model.execute, max_batch_prompts=4, max_batch_tokens=1000)
    engine = _engine(tokenizer, seq_length=100, max_tokens=8, max_prompts=3)
    app = build_app(engine, scheduler, max_body_bytes=2000, api_key=KEY)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            scheduler.run_next(timeout=0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client, tokenizer
    stop.set()
    thread.join(5)


def test_app_routes_limits_and_errors(fake_app):
    client, tokenizer = fake_app
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["m"] and models[0]["max_model_len"] == 100
    unauthorized = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"]["type"] == "AuthenticationError"

    def post(body, path="/v1/completions", **kwargs):
        response = client.post(path, json=body, **kwargs) if not isinstance(body, bytes) else (
            client.post(path, content=body, **kwargs)
        )  # fmt: skip
        return response.status_code, response.json()

    status, answer = post({"prompt": ["a b", "c"], "max_tokens": 1, "logprobs": 1, "echo": True})
    assert status == 200 and len(answer["choices"]) == 2
    first = answer["choices"][0]
    prompt = tokenizer.tokenize("a b")
    assert first["logprobs"]["token_logprobs"][: len(prompt)] == [None] + [
        -1.0 - i for i in range(len(prompt) - 1)
    ]
    assert first["logprobs"]["token_logprobs"][-1] == -0.5
    assert first["text"].startswith("a b")
    assert answer["usage"]["prompt_tokens"] == len(prompt) + len(tokenizer.tokenize("c"))
    # Generation: the fake ends with EOD, kept as a token, finish "stop".
    status, answer = post({"prompt": "a", "max_tokens": 4, "logprobs": 0})
    assert status == 200 and answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == 4
    # add_special_tokens false: no BOS.
    status, answer = post({"prompt": "a", "max_tokens": 0, "add_special_tokens": False})
    assert status == 200 and answer["usage"]["prompt_tokens"] == len(tokenizer.tokenize("a")) - 1

    for body, expected, field in (
        ({"prompt": ["a"] * 4}, 400, "prompt"),
        ({"prompt": "a", "max_tokens": 9}, 400, "max_tokens"),
        ({"prompt": "a", "model": "other"}, 404, "model"),
        (b'{"prompt": "' + b"a" * 2000 + b'"}', 413, None),
        ({"prompt": "boom", "max_tokens": 1}, 500, None),
        ({"messages": MESSAGES, "max_tokens": 40}, 400, "max_tokens"),
        (
            {"messages": [{"role": "user", "content": "fox " * 40}], "max_tokens": 8},
            400,
            "messages",
        ),
    ):
        chat = isinstance(body, dict) and "messages" in body
        path = "/v1/chat/completions" if chat else "/v1/completions"
        status, answer = post(body, path)
        assert status == expected, (body, answer)
        assert answer["error"]["code"] == expected and answer["error"]["param"] == field
    assert answer["error"]["message"] != "" and "secret" not in json.dumps(answer)
    status, answer = post({"prompt": "boom", "max_tokens": 1})
    assert answer["error"] == {"message": "internal error", "type": "InternalServerError",
                               "param": None, "code": 500}  # fmt: skip
    # A chunked body over the limit: 413 as well.
    response = client.post("/v1/completions", content=iter([b'{"prompt": "', b"a" * 2500, b'"}']))
    assert response.status_code == 413
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/completions").json()["error"]["code"] == 405

    status, answer = post({"messages": MESSAGES, "max_tokens": 3, "logprobs": True,
                           "top_logprobs": 1}, "/v1/chat/completions")  # fmt: skip
    assert status == 200 and answer["object"] == "chat.completion"
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
    content = choice["logprobs"]["content"]
    assert len(content) == 3 and content[0]["top_logprobs"][0]["logprob"] == -0.1
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    rendered = tokenizer.render_chat(MESSAGES)
    assert answer["usage"]["prompt_tokens"] == len(tokenizer.tokenize_rendered(rendered))


def test_chat_needs_a_chat_template():
    from fastapi.testclient import TestClient

    from megatron_sip.data.tokenizers import NullTokenizer
    from megatron_sip.serving.app import build_app
    from megatron_sip.serving.scheduler import Scheduler

    scheduler = Scheduler(lambda key, payloads: [], 4, 100)
    app = build_app(_engine(NullTokenizer(100)), scheduler, max_body_bytes=1000)
    response = TestClient(app).post("/v1/chat/completions", json={"messages": MESSAGES})
    assert response.status_code == 400
    assert "this model has no chat template" in response.json()["error"]["message"]


def test_flags_and_exposure(monkeypatch):
    from megatron_sip.errors import ConfigError
    from megatron_sip.serving.config import ServingConfig, check_exposure, is_loopback

    serve = _serve_judge_module()
    config, platform, parallel = serve.parse_args(["--load", "ckpt"])
    assert (config.host, config.max_batch_prompts, config.max_prompts_per_request) == (
        "127.0.0.1", 64, 256)  # fmt: skip
    assert (config.max_body_bytes, config.idle_timeout, config.backlog) == (1 << 20, 5.0, 2048)
    assert config.resolved_max_tokens(64) == 63 and config.resolved_max_tokens(4096) == 512
    assert platform.device == "auto" and parallel.tensor_model_parallel_size == 1
    config, _, parallel = serve.parse_args(
        ["--load", "c", "--max-tokens-limit", "8", "--tensor-model-parallel-size", "2",
         "--idle-timeout", "0.5", "--max-body-bytes", "10"]
    )  # fmt: skip
    assert config.resolved_max_tokens(64) == 8 and parallel.tensor_model_parallel_size == 2
    with pytest.raises(ConfigError, match="--max-tokens-limit"):
        ServingConfig(load="c", max_tokens_limit=64).resolved_max_tokens(64)
    for bad in (["--max-batch-prompts", "0"], ["--idle-timeout", "-1"], ["--port", "70000"], []):
        with pytest.raises(SystemExit):
            serve.parse_args(["--load", "c", *bad] if bad else [])
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("8.8.8.8")
    check_exposure(ServingConfig(load="c", host="0.0.0.0"), api_key="k")
    with pytest.raises(ConfigError, match="--api-key-env"):
        check_exposure(ServingConfig(load="c", host="0.0.0.0"), api_key=None)


def _serve_judge_module():
    import importlib.util

    name = "megatron_sip_tools_serve_judge"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "serve_judge.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_refuses_a_public_host_without_a_key(tmp_path):
    """Before loading anything: exit 2 naming the fix."""
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "serve_judge.py"), "--load", str(tmp_path),
         "--host", "0.0.0.0", "--port", "0", "--device", "cpu"],
        capture_output=True, text=True, timeout=120, env=_server_env(),
    )  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    assert "0.0.0.0 is not a loopback address" in run.stderr and "--api-key-env" in run.stderr


# -------------------------------------------------------------------------------------------
# The real server on a tiny checkpoint
# -------------------------------------------------------------------------------------------


def _checkpoint_and_reference(root: str, tokenizer_dir: str, prompt_dir: str, out: str) -> None:
    """Runs in a spawned world of one: saves a tiny Llama-style checkpoint with the test's Hugging
    Face tokenizer (and its chat template), and the colocated roles' answers."""
    import torch

    from megatron_sip.data.config import TokenizerConfig
    from megatron_sip.initialize import destroy_distributed
    from megatron_sip.models.checkpointing import model_metadata, save_checkpoint, unwrap_model
    from megatron_sip.models.gpt import build_model
    from megatron_sip.roles.megatron_backend import MegatronJudge, RoleModel
    from megatron_sip.roles.prompts import PromptSet

    from . import workers

    parallel, context = workers.setup()
    shape = workers.tiny_llama(seq_length=SEQ, max_position_embeddings=SEQ)
    chunks, _ = build_model(shape, parallel, HF_VOCAB_ROWS, context.pg_collection)
    tokenizer = TokenizerConfig(
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_dir,
        tokenizer_hf_include_special_tokens=True,
    )  # fmt: skip
    from megatron_sip.data.tokenizers import build_tokenizer

    hf = build_tokenizer(tokenizer)
    generator = torch.Generator().manual_seed(3)
    for param in chunks[0].parameters():  # sharper than the initialisation: no near-ties
        param.data.add_(torch.randn(param.shape, generator=generator) * 0.05)
    # A trained judge ranks its verdict tokens near the top: imitated with hidden dimension 0
    # made large for every token, and read by the verdicts' output rows.
    model = unwrap_model(chunks[0])
    model.embedding.word_embeddings.weight.data[:, 0] = 0.5
    for verdicts in VERDICTS.values():
        for verdict in verdicts:
            model.output_layer.weight.data[hf.vocab[verdict], 0] += 3.0
    save_checkpoint(root, 0, chunks, extra_common=model_metadata(shape, tokenizer))
    role = RoleModel(root, parallel, context.pg_collection)
    judge = MegatronJudge(role, PromptSet.load(prompt_dir))

    def next_log_probs(ids):
        return role.next_token_log_probs([ids])[0][: hf.vocab_size].tolist()

    results = {
        "verdicts": {name: judge.verdicts(name, JUDGE_PROMPTS[name]) for name in JUDGE_PROMPTS},
        "prompt_ids": hf.tokenize(PROMPT),
        "next_log_probs": next_log_probs(hf.tokenize(PROMPT)),
        "next_log_probs_no_bos": next_log_probs(hf.tokenize_rendered(PROMPT)),
        "chat_ids": hf.tokenize_rendered(hf.render_chat(MESSAGES)),
        "chat_log_probs": next_log_probs(hf.tokenize_rendered(hf.render_chat(MESSAGES))),
        "prefill_ids": hf.tokenize_rendered(
            hf.render_chat(PREFILL, add_generation_prompt=False, continue_final_message=True)
        ),
    }
    results["prefill_log_probs"] = next_log_probs(results["prefill_ids"])
    results["texts"] = {str(i): hf.detokenize([i]) for i in range(hf.vocab_size)}
    Path(out).write_text(json.dumps(results))
    destroy_distributed()


def _server_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", SIP_TEST_SERVE_KEY=KEY, PYTHONUNBUFFERED="1")
    return env


class ServerProcess:
    """tools/serve_judge.py (or any command) with its output drained."""

    def __init__(self, command: list[str]):
        self.process = subprocess.Popen(
            command, cwd=REPO, env=_server_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            match = re.search(r"serving \S+ on (http://\S+)", line)
            if match:
                return match.group(1)
        raise AssertionError("serve_judge.py did not start:\n" + "".join(self.output))

    def stop(self, signum=signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                return -9
        return self.process.returncode


def _serve_command(load: Path, *flags: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "serve_judge.py"), "--load", str(load),
            "--port", "0", "--model-name", "tiny", "--device", "cpu",
            "--api-key-env", "SIP_TEST_SERVE_KEY", *flags]  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(checkpoint directory, reference answers of the colocated roles)."""
    from .distributed import run_ranks
    from .hf_utils import write_tokenizer

    root = tmp_path_factory.mktemp("serve")
    write_tokenizer(root / "tokenizer", adds_bos=True)
    (root / "prompts").mkdir()
    for name, text in TEMPLATES.items():
        (root / "prompts" / name).write_text(text + "\n")
    run_ranks(_checkpoint_and_reference, 1, str(root / "ckpt"), str(root / "tokenizer"),
              str(root / "prompts"), str(root / "reference.json"))  # fmt: skip
    return root / "ckpt", json.loads((root / "reference.json").read_text())


@pytest.fixture(scope="module")
def server(built):
    """The TP=1 server: small batches (fairness shows), a 2 s idle timeout, default caps."""
    process = ServerProcess(_serve_command(built[0], "--max-batch-prompts", "8",
                                           "--idle-timeout", "2"))  # fmt: skip
    try:
        url = process.wait_ready(timeout=120)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60) as client:  # fmt: skip
            yield url, client, process
    finally:
        process.stop()
        print("".join(process.output))  # shown when a test fails


def _verdict(top: dict, verdicts: tuple[str, str]) -> float:
    positive, negative = (top[v] for v in verdicts)
    return 1.0 / (1.0 + math.exp(negative - positive))


def _judge(client, prompts, **extra) -> list[dict]:
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 1, "temperature": 0,
            "logprobs": 20, **extra}  # fmt: skip
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return [choice["logprobs"]["top_logprobs"][0] for choice in response.json()["choices"]]


def _check_normal_request(client, reference) -> None:
    """One greedy token with logprobs equals the colocated model's distribution."""
    top = _judge(client, PROMPT)[0]
    expected = reference["next_log_probs"]
    assert 15 <= len(top) <= 20  # tokens of the same text (partial UTF-8) share an entry
    for text, value in top.items():
        ids = [int(i) for i, t in reference["texts"].items() if t == text]
        assert value == pytest.approx(max(expected[i] for i in ids), abs=1e-5), text


@pytest.mark.slow
def test_completions_match_the_colocated_judge(built, server):
    _, reference = built
    url, client, _ = server
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"
    # Small answers leave at once (TCP_NODELAY): no ~40 ms wait on the client's delayed ACK.
    waits = []
    for _ in range(9):
        begun = time.monotonic()
        assert client.get("/health").status_code == 200
        waits.append(time.monotonic() - begun)
    assert sorted(waits)[4] < 0.02, waits

    # The judge's path: P(positive) from the top 20 equals MegatronJudge.verdicts.
    for name, prompts in JUDGE_PROMPTS.items():
        tops = _judge(client, prompts)
        ours = [_verdict(top, VERDICTS[name]) for top in tops]
        assert ours == pytest.approx(reference["verdicts"][name], abs=1e-5), name

    # One greedy token with logprobs: the model's full distribution; texts as detokenized.
    body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 5}
    answer = client.post("/v1/completions", json=body).json()
    choice = answer["choices"][0]
    expected = reference["next_log_probs"]
    best = max(range(len(expected)), key=expected.__getitem__)
    assert choice["logprobs"]["tokens"] == [reference["texts"][str(best)]]
    assert choice["logprobs"]["token_logprobs"][0] == pytest.approx(expected[best], abs=1e-5)
    assert len(choice["logprobs"]["top_logprobs"][0]) == 5
    prompt_tokens = len(reference["prompt_ids"])
    assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 1,
                               "total_tokens": prompt_tokens + 1}  # fmt: skip
    _check_normal_request(client, reference)
    # add_special_tokens false: the text as a chat template's rendering (no BOS).
    top = _judge(client, PROMPT, add_special_tokens=False)[0]
    no_bos = reference["next_log_probs_no_bos"]
    best = max(range(len(no_bos)), key=no_bos.__getitem__)
    assert top[reference["texts"][str(best)]] == pytest.approx(no_bos[best], abs=1e-5)

    # Several tokens, echoed: the prompt's own log-probs come first (the first is null).
    body = {"prompt": [PROMPT, "Paris is"], "max_tokens": 4, "temperature": 0, "logprobs": 2,
            "echo": True}  # fmt: skip
    answer = client.post("/v1/completions", json=body).json()
    first = answer["choices"][0]
    logprobs = first["logprobs"]
    assert first["text"].startswith(PROMPT)
    n = prompt_tokens
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert len(logprobs["tokens"]) == len(logprobs["text_offset"]) == n + 4
    greedy = logprobs["tokens"][n]
    assert logprobs["token_logprobs"][n] == pytest.approx(max(expected), abs=1e-4)
    assert greedy == reference["texts"][str(expected.index(max(expected)))]
    for token, value, alternatives in zip(
        logprobs["tokens"][n:], logprobs["token_logprobs"][n:], logprobs["top_logprobs"][n:]
    ):  # greedy: each new token is its position's most likely one
        assert value == pytest.approx(max(alternatives.values()), abs=1e-6)
        assert alternatives[token] == value

    # A stop string cuts the text (and the tokens after it).
    generated = logprobs["tokens"][n:]
    full = first["text"][len(PROMPT) :]
    stop = generated[2]
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 0, "stop": [stop]}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == full[: full.find(stop)]
    assert choice["logprobs"]["tokens"] == generated[: len(choice["logprobs"]["tokens"])]
    # A seeded sampled request gives the same answer twice.
    body = {"prompt": [PROMPT, "Paris"], "max_tokens": 5, "temperature": 1.0, "seed": 7}
    texts = [[c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]
             for _ in range(2)]  # fmt: skip
    assert texts[0] == texts[1]


@pytest.mark.slow
def test_the_sip_judge_client_reads_the_server_as_the_colocated_judge(built, server, monkeypatch):
    """SIP's own client (--judge-backend openai, several prompts per request) on this server
    gives the colocated judge's verdicts, and passes the start-up self-check."""
    from megatron_sip.roles.config import JudgeConfig, build_judge
    from megatron_sip.roles.self_check import check_judge

    checkpoint, reference = built
    url, _, _ = server
    monkeypatch.setenv("SIP_TEST_SERVE_KEY", KEY)
    config = JudgeConfig(
        judge_backend="openai", judge_url=url, judge_api_key_env="SIP_TEST_SERVE_KEY",
        judge_prompt_dir=str(checkpoint.parent / "prompts"), judge_prompts_per_request=3,
        judge_min_calibration_accuracy=0.0,
    )  # fmt: skip
    judge = build_judge(config)
    try:
        assert judge.client.model == "tiny"  # the one model the server lists
        for name, prompts in JUDGE_PROMPTS.items():
            assert judge.verdicts(name, prompts) == pytest.approx(
                reference["verdicts"][name], abs=1e-5
            ), name
        assert check_judge(judge, config)["source"] == "placeholder prompts"
        assert judge.client.stats.total_failures == 0 and judge.client.stats.unparsed == 0
    finally:
        judge.close()


@pytest.mark.slow
def test_chat_completions_match_the_chat_template_and_model(built, server):
    _, reference = built
    _, client, _ = server
    body = {"model": "tiny", "messages": MESSAGES, "max_completion_tokens": 1, "temperature": 0,
            "logprobs": True, "top_logprobs": 20}  # fmt: skip
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    choice = answer["choices"][0]
    expected = reference["chat_log_probs"]
    best = max(range(len(expected)), key=expected.__getitem__)
    assert choice["message"] == {"role": "assistant", "content": choice["message"]["content"]}
    entry = choice["logprobs"]["content"][0]
    assert entry["token"] == reference["texts"][str(best)]
    assert entry["logprob"] == pytest.approx(expected[best], abs=1e-5)
    assert entry["bytes"] == list(entry["token"].encode())
    assert len(entry["top_logprobs"]) == 20
    values = [alternative["logprob"] for alternative in entry["top_logprobs"]]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(sorted(expected, reverse=True)[:20], abs=1e-5)
    assert answer["usage"]["prompt_tokens"] == len(reference["chat_ids"])
    # Continuing the assistant's message (vLLM's continue_final_message).
    body = {"messages": PREFILL, "max_tokens": 1, "temperature": 0, "logprobs": True,
            "add_generation_prompt": False, "continue_final_message": True,
            "chat_template_kwargs": {"enable_thinking": False}}  # fmt: skip
    answer = client.post("/v1/chat/completions", json=body).json()
    assert answer["usage"]["prompt_tokens"] == len(reference["prefill_ids"])
    expected = reference["prefill_log_probs"]
    content = answer["choices"][0]["logprobs"]["content"]
    assert content[0]["logprob"] == pytest.approx(max(expected), abs=1e-5)
    assert content[0]["top_logprobs"] == []
    # Generation with the default max_tokens: until EOD or the sequence fills.
    answer = client.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0})
    choice = answer.json()["choices"][0]
    usage = answer.json()["usage"]
    assert choice["logprobs"] is None and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "stop" or usage["total_tokens"] == SEQ


@pytest.mark.slow
def test_malformed_and_oversized_requests_then_a_normal_one(built, server):
    _, reference = built
    url, client, _ = server
    oversized_body = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
    cases = [
        (b'{"prompt": "x", "temperature": NaN}', 400, "NaN"),
        (b'{"prompt": "x", "top_p": Infinity}', 400, "Infinity"),
        (b'{"prompt": "x", "temperature": -Infinity}', 400, "-Infinity"),
        (b'{"prompt": "x", "seed": 1' + b"0" * 400 + b"}", 400, "64-bit"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested deeper than 64"),
        (b'{"prompt": "x", "echo": "no"}', 400, "'echo'"),
        (b'{"prompt": "x", "temprature": 0}', 400, "unknown field 'temprature'"),
        (json.dumps({"prompt": ["1"] * 257}).encode(), 400, "at most 256"),
        (oversized_body, 413, "at most 1048576 bytes"),
        (b'{"prompt": "x", "max_tokens": 128}', 400, "'max_tokens' must be at most 127"),
        (b'{"prompt": "x", "logprobs": 21}', 400, "'logprobs'"),
        (b'{"prompt": "x", "stream": true}', 400, "'stream'"),
        (b"{not json", 400, "not valid JSON"),
        (b'{"prompt": "x", "model": "other"}', 404, "does not exist"),
    ]
    for body, status, message in cases:
        response = client.post("/v1/completions", content=body,
                               headers={"Content-Type": "application/json"})  # fmt: skip
        assert response.status_code == status, (body[:80], response.text)
        error = response.json()["error"]
        assert error["code"] == status and message in error["message"], error
        _check_normal_request(client, reference)
    chat = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 128})
    assert chat.status_code == 400 and "'max_tokens'" in chat.json()["error"]["message"]
    wrong_key = httpx.post(f"{url}/v1/completions", json={"prompt": "x"},
                           headers={"Authorization": "Bearer wrong"})  # fmt: skip
    assert wrong_key.status_code == 401
    assert client.post("/v1/nowhere", json={}).status_code == 404
    _check_normal_request(client, reference)


@pytest.mark.slow
def test_sixty_four_concurrent_clients_all_answered(built, server):
    _, reference = built
    url, client, _ = server
    prompts = [f"{PROMPT} {word}" for word in ("jumps", "sleeps", "runs", "is", "the", "over",
                                               "lazy", "dog")]  # fmt: skip
    expected = {p: _judge(client, p)[0] for p in prompts}
    start = threading.Barrier(64)

    def one(index: int) -> dict:
        prompt = prompts[index % len(prompts)]
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
        ) as own:  # a connection of its own
            start.wait()
            return prompt, _judge(own, prompt)[0]

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert len(results) == 64
    for prompt, top in results:
        assert top.keys() == expected[prompt].keys()
        for text, value in top.items():
            assert value == pytest.approx(expected[prompt][text], abs=1e-5)
    _check_normal_request(client, reference)


def _closed_after(sock: socket.socket, timeout: float = 15) -> float:
    """Seconds until the server closes ``sock`` (reads and drops what it sends)."""
    begun = time.monotonic()
    sock.settimeout(timeout)
    while sock.recv(65536):
        pass
    return time.monotonic() - begun


@pytest.mark.slow
def test_idle_connections_are_dropped_after_the_idle_timeout(built, server):
    _, reference = built
    url, client, _ = server
    host, port = url.removeprefix("http://").rsplit(":", 1)

    def silent() -> float:
        with socket.create_connection((host, int(port))) as sock:
            return _closed_after(sock)

    def half_request() -> float:
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
            return _closed_after(sock)

    def kept_alive() -> float:
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(10)
            assert b"200 OK" in sock.recv(65536)
            return _closed_after(sock)

    def refused_then_idle() -> float:  # a 401 answered before its body was read
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n"
                         b"\r\n" + b'{"prompt": 1}')  # fmt: skip
            sock.settimeout(10)
            assert b"401 Unauthorized" in sock.recv(65536)
            return _closed_after(sock)

    checks = (silent, half_request, kept_alive, refused_then_idle)
    with concurrent.futures.ThreadPoolExecutor(len(checks)) as pool:
        waits = list(pool.map(lambda f: f(), checks))
    for wait in waits:  # --idle-timeout 2
        assert 1.5 < wait < 5, waits
    _check_normal_request(client, reference)


@pytest.mark.slow
def test_a_small_request_is_not_stuck_behind_a_heavy_one(built, server):
    _, reference = built
    url, client, _ = server
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 5)
    heavy_body = {"prompt": [f"{i} {long_prompt}" for i in range(256)], "max_tokens": 1,
                  "logprobs": 20, "temperature": 0}  # fmt: skip
    done: dict[str, float] = {}

    def heavy(index: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=300) as own:  # fmt: skip
            assert own.post("/v1/completions", json=heavy_body).status_code == 200
        done[f"heavy{index}"] = time.monotonic()

    begun = time.monotonic()
    threads = [threading.Thread(target=heavy, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # the heavy requests are queued and running
    sent = time.monotonic()
    _check_normal_request(client, reference)
    small = time.monotonic() - sent
    for thread in threads:
        thread.join()
    heavy_time = max(done.values()) - begun
    print(f"small request: {small:.3f} s while 4 x 256 prompts took {heavy_time:.3f} s")
    assert all(at > sent + small for at in done.values()), (done, sent, small)
    assert small < 0.25 * heavy_time, (small, heavy_time)


@pytest.mark.slow
def test_a_client_that_goes_away_frees_the_model(built, server):
    _, reference = built
    url, client, process = server
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"prompt": [f"{i} {PROMPT}" for i in range(256)], "max_tokens": 24,
                       "temperature": 0}).encode()  # fmt: skip
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + body)
        time.sleep(0.3)  # the model is on it: 32 calls of 8 prompts x 24 tokens
    deadline = time.monotonic() + 10
    while not any("the client went away" in line for line in process.output):
        assert time.monotonic() < deadline, "".join(process.output[-20:])
        time.sleep(0.05)
    begun = time.monotonic()
    _check_normal_request(client, reference)
    assert time.monotonic() - begun < 1.0  # its remaining prompts were dropped


@pytest.mark.slow
def test_tensor_parallel_server_answers_as_tp1(built, server):
    from .distributed import free_port

    load, reference = built
    _, client, _ = server
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               *_serve_command(load, "--tensor-model-parallel-size", "2")[1:]]  # fmt: skip
    process = ServerProcess(command)
    try:
        url = process.wait_ready(timeout=180)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60) as tp2:  # fmt: skip
            for prompts in JUDGE_PROMPTS.values():
                for ours, theirs in zip(_judge(tp2, prompts), _judge(client, prompts)):
                    assert ours.keys() == theirs.keys()
                    for text, value in ours.items():
                        assert value == pytest.approx(theirs[text], abs=1e-4)
            body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logprobs": 3,
                    "echo": True}  # fmt: skip
            ours = tp2.post("/v1/completions", json=body).json()["choices"][0]
            theirs = client.post("/v1/completions", json=body).json()["choices"][0]
            assert ours["text"] == theirs["text"]
            assert ours["logprobs"]["token_logprobs"][1:] == pytest.approx(
                theirs["logprobs"]["token_logprobs"][1:], abs=1e-4
            )
        # SIGTERM to rank 0: it tells rank 1 to stop, both exit 0, and so does torchrun.
        import psutil

        ranks = psutil.Process(process.process.pid).children(recursive=True)
        leader = next(p for p in ranks if p.environ().get("RANK") == "0")
        leader.send_signal(signal.SIGTERM)
        assert process.process.wait(timeout=60) == 0, "".join(process.output)
    finally:
        process.stop()
        print("".join(process.output))


@pytest.mark.slow
def test_sigterm_stops_the_server_cleanly(server):
    """Last: stops the module's server."""
    _, client, process = server
    assert client.get("/health").status_code == 200
    assert process.stop(signal.SIGTERM) == 0, "".join(process.output)
    assert any("shutting down" in line for line in process.output)
