"""The judge and rewriter behind an OpenAI-compatible server: the HTTP client against fake servers
(logprobs, text only, errors, timeouts, auth, a server that goes away), and tools/serve_judge.py
serving a tiny checkpoint, whose verdicts must equal the colocated judge's."""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from megatron_sip.errors import ConfigError
from megatron_sip.roles.config import JudgeConfig, RewriterConfig, build_judge, build_rewriter
from megatron_sip.roles.openai_client import (
    OpenAICompletionsClient,
    OpenAIJudge,
    OpenAIRewriter,
    completions_url,
    verdict_from_choice,
)
from megatron_sip.roles.prompts import PromptSet

REPO = Path(__file__).resolve().parent.parent

# -------------------------------------------------------------------------------------------
# Fake servers
# -------------------------------------------------------------------------------------------


class FakeServer:
    """A completions server on a free 127.0.0.1 port; ``respond(payload, headers)`` returns
    (status, body bytes or a JSON-able object)."""

    def __init__(self, respond):
        self.respond = respond
        self.payloads: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.released = threading.Event()  # set on close: sleeping handlers wake up
        lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(length))
                with lock:
                    fake.payloads.append(payload)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    status, body = fake.respond(payload, self.headers)
                finally:
                    with lock:
                        fake.in_flight -= 1
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout test)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@contextlib.contextmanager
def fake_server(respond):
    server = FakeServer(respond)
    try:
        yield server
    finally:
        server.close()


def completion(text: str, top: dict | None = None) -> dict:
    logprobs = None
    if top is not None:
        logprobs = {
            "tokens": [text],
            "token_logprobs": [top.get(text, -1.0)],
            "top_logprobs": [top],
            "text_offset": [0],
        }
    choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": logprobs}
    return {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [choice]}


def client_for(server: FakeServer, **kwargs) -> OpenAICompletionsClient:
    options = dict(timeout=5.0, max_retries=2, concurrency=4, backoff=0.01)
    options.update(kwargs)
    return OpenAICompletionsClient(server.url, "m", **options)


PROMPTS = PromptSet.load()
PREFIXES = ["The river", "A quiet town"]
GOOD = ["flows to the sea.", "sleeps under snow."]
BAD = ["is purple idiots.", "eats the moon."]


# -------------------------------------------------------------------------------------------
# Client against fake servers
# -------------------------------------------------------------------------------------------


def test_completions_url():
    assert completions_url("http://h:8000") == "http://h:8000/v1/completions"
    assert completions_url("http://h:8000/v1/") == "http://h:8000/v1/completions"
    assert completions_url("http://h/v1/completions") == "http://h/v1/completions"


def test_judge_reads_verdict_logprobs_and_averages_both_orders():
    def respond(payload, headers):
        prompt = payload["prompt"]
        if "Is the continuation safe?" in prompt:
            safe = 0.9 if "flows" in prompt or "sleeps" in prompt else 0.2
            # Leading spaces in token texts are ignored; other tokens do not count.
            top = {" [[SAFE]]": math.log(safe * 0.5), "[[UNSAFE]]": math.log((1 - safe) * 0.5),
                   "Yes": math.log(0.5)}  # fmt: skip
            return 200, completion("Yes", top)
        if "Which continuation" in prompt:
            first = prompt.split("<candidate_a>")[1].split("</candidate_a>")[0]
            p_a = 0.7 if "flows" in first or "sleeps" in first else 0.4
            top = {"[[A]]": math.log(p_a), "[[B]]": math.log(1 - p_a)}
            return 200, completion("[[A]]", top)
        return 400, {"error": {"message": "unexpected prompt"}}

    with fake_server(respond) as server:
        client = client_for(server)
        judge = OpenAIJudge(client, PROMPTS)
        assert judge.safety(PREFIXES, GOOD) == pytest.approx([0.9, 0.9])
        assert judge.safety(PREFIXES, BAD) == pytest.approx([0.2, 0.2])
        # forward P(good first) = 0.7, backward P(bad first) = 0.4 -> 0.5 * (0.7 + 0.6)
        assert judge.quality(PREFIXES, GOOD, BAD) == pytest.approx([0.65, 0.65])
        assert judge.quality(PREFIXES, BAD, GOOD) == pytest.approx([0.35, 0.35])
        assert judge.safety([], []) == []
        sent = server.payloads[0]
        assert sent["max_tokens"] == 1 and sent["temperature"] == 0.0
        assert sent["logprobs"] == 20 and sent["model"] == "m"
        assert client.stats.successes == client.stats.requests == 12
        assert client.stats.failures == {}
        assert judge.identity == f"openai:{server.url}:m:{PROMPTS.fingerprint()}"
        judge.close()


def test_verdict_falls_back_to_strict_text_parse():
    verdicts = ("[[SAFE]]", "[[UNSAFE]]")
    assert verdict_from_choice({"text": "[[SAFE]]", "logprobs": None}, verdicts) == 1.0
    assert verdict_from_choice({"text": " [[UNSAFE]]\n"}, verdicts) == 0.0
    assert verdict_from_choice({"text": "[[SAFE]] or [[UNSAFE]]"}, verdicts) is None
    assert verdict_from_choice({"text": "maybe"}, verdicts) is None
    assert verdict_from_choice(None, verdicts) is None
    # Only one verdict among the top tokens: the text decides.
    one = {"text": "[[UNSAFE]]", "logprobs": {"top_logprobs": [{"[[UNSAFE]]": -0.1, "x": -3}]}}
    assert verdict_from_choice(one, verdicts) == 0.0

    def respond(payload, headers):
        text = "[[SAFE]]" if "flows" in payload["prompt"] else "[[UNSAFE]] I think"
        return 200, completion(text)  # logprobs: null

    with fake_server(respond) as server:
        judge = OpenAIJudge(client_for(server), PROMPTS)
        assert judge.safety(PREFIXES, [GOOD[0], BAD[1]]) == [1.0, 0.0]
        judge.close()


def test_garbage_and_server_errors_are_missing_and_counted():
    def garbage(payload, headers):
        return 200, b"<html>not json"

    with fake_server(garbage) as server:
        client = client_for(server)
        judge = OpenAIJudge(client, PROMPTS)
        assert judge.safety(PREFIXES, GOOD) == [None, None]
        assert client.stats.failures == {"bad_response": 2}
        assert client.stats.retries == 0  # a malformed answer is not retried
        judge.close()

    def error_500(payload, headers):
        return 500, {"error": {"message": "boom"}}

    with fake_server(error_500) as server:
        client = client_for(server, max_retries=2)
        judge = OpenAIJudge(client, PROMPTS)
        assert judge.quality(PREFIXES, GOOD, BAD) == [None, None]
        assert client.stats.failures == {"http_500": 4}
        assert client.stats.retries == 4 * 2
        assert client.stats.requests == 4 * 3
        judge.close()

    calls = {"n": 0}
    lock = threading.Lock()

    def flaky(payload, headers):
        with lock:
            calls["n"] += 1
            first = calls["n"] == 1
        if first:
            return 503, {"error": {"message": "warming up"}}
        return 200, completion("[[SAFE]]", {"[[SAFE]]": -0.5, "[[UNSAFE]]": -0.5})

    with fake_server(flaky) as server:
        client = client_for(server, concurrency=1)
        judge = OpenAIJudge(client, PROMPTS)
        assert judge.safety(PREFIXES, GOOD) == pytest.approx([0.5, 0.5])
        assert client.stats.retries == 1 and client.stats.failures == {}
        judge.close()


def test_timeout_is_missing_in_bounded_time():
    def slow(payload, headers):
        server.released.wait(10)
        return 200, completion("[[SAFE]]")

    with fake_server(slow) as server:
        client = client_for(server, timeout=0.3, max_retries=1, concurrency=2)
        judge = OpenAIJudge(client, PROMPTS)
        start = time.monotonic()
        assert judge.safety(PREFIXES, GOOD) == [None, None]
        assert time.monotonic() - start < 3.0
        assert client.stats.failures == {"timeout": 2}
        assert client.stats.retries == 2
        judge.close()


def test_bearer_token(monkeypatch):
    def respond(payload, headers):
        if headers.get("Authorization") != "Bearer s3cret":
            return 401, {"error": {"message": "missing or wrong bearer token"}}
        return 200, completion("[[SAFE]]", {"[[SAFE]]": math.log(0.6), "[[UNSAFE]]": math.log(0.4)})

    with fake_server(respond) as server:
        anonymous = client_for(server)
        judge = OpenAIJudge(anonymous, PROMPTS)
        assert judge.safety(PREFIXES, GOOD) == [None, None]
        assert anonymous.stats.failures == {"http_401": 2}
        assert anonymous.stats.retries == 0  # a 4xx other than 429 is not retried
        judge.close()

        monkeypatch.delenv("SIP_TEST_KEY", raising=False)
        with pytest.raises(ValueError, match="SIP_TEST_KEY"):
            client_for(server, api_key_env="SIP_TEST_KEY")
        config = JudgeConfig(
            judge_backend="openai", judge_url=server.url, judge_api_key_env="SIP_TEST_KEY"
        )
        with pytest.raises(ConfigError, match="--judge-api-key-env"):
            build_judge(config)

        monkeypatch.setenv("SIP_TEST_KEY", "s3cret")
        judge = build_judge(config)
        assert isinstance(judge, OpenAIJudge)
        assert judge.safety(PREFIXES, GOOD) == pytest.approx([0.6, 0.6])
        judge.close()


def test_server_going_away_mid_run():
    def respond(payload, headers):
        return 200, completion("[[A]]", {"[[A]]": math.log(0.8), "[[B]]": math.log(0.2)})

    server = FakeServer(respond)
    try:
        client = client_for(server, max_retries=1)
        judge = OpenAIJudge(client, PROMPTS)
        assert judge.prefer(PREFIXES, GOOD, BAD) == pytest.approx([0.8, 0.8])
    finally:
        server.close()
    assert judge.prefer(PREFIXES, GOOD, BAD) == [None, None]
    assert judge.quality(PREFIXES, GOOD, BAD) == [None, None]
    assert client.stats.failures == {"connection": 6}
    judge.close()


def test_concurrency_limit():
    def respond(payload, headers):
        time.sleep(0.05)
        return 200, completion("[[SAFE]]")

    with fake_server(respond) as server:
        judge = OpenAIJudge(client_for(server, concurrency=2), PROMPTS)
        assert judge.safety(["p"] * 8, ["t"] * 8) == [1.0] * 8
        assert server.max_in_flight == 2
        judge.close()


def test_rewriter_cuts_at_stop_string():
    def respond(payload, headers):
        if "broken" in payload["prompt"]:
            return 500, {"error": {"message": "boom"}}
        return 200, completion("  a calm river.\n</rewrite> and more")

    with fake_server(respond) as server:
        config = RewriterConfig(
            rewriter_backend="openai", rewriter_url=server.url, rewriter_model="m",
            rewriter_max_tokens=40, rewriter_max_retries=0,
        )  # fmt: skip
        rewriter = build_rewriter(config)
        assert isinstance(rewriter, OpenAIRewriter)
        assert rewriter.rewrite(["The river", "x"], ["is wet", "broken"]) == ["a calm river.", None]
        sent = server.payloads[0]
        assert sent["stop"] == ["</rewrite>"] and sent["max_tokens"] == 40
        assert sent["temperature"] == 0.0 and sent["model"] == "m"
        assert rewriter.rewrite([], []) == []
        rewriter.close()


# -------------------------------------------------------------------------------------------
# tools/serve_judge.py on a tiny checkpoint
# -------------------------------------------------------------------------------------------

# NullTokenizer text is whitespace-separated ids; verdicts are single ids. Field values avoid the
# digits 7 and 8 (the sanitiser removes verdict strings from them) and stay below 100.
TEMPLATES = {
    "safety.txt": "# verdicts: 7 8\n1 2 3 {prefix} 4 5 {candidate} 6 9 10",
    "factuality.txt": "# verdicts: 250 251\n11 12 {prefix} 13 {candidate} 14",
    "quality.txt": "# verdicts: 200 201\n15 {prefix} 16 {a} 19 {b} 21 22",
    "rewrite.txt": "# stop: 254\n23 {prefix} 24 {suffix} 25",
}
VERDICT_IDS = (7, 8, 200, 201, 250, 251)
TINY_PREFIXES = ["31 32 33", "41 42", " ".join(str(i) for i in range(30, 66))]  # the last: long
TINY_TEXTS = ["51 52 53 54", "61 62", "90 91 92"]
TINY_REFERENCES = ["12 13", "34 35 36", "49"]
REWRITE_TOKENS = 6


def _serve_judge_module():
    import importlib.util

    name = "megatron_sip_tools_serve_judge"
    if name not in sys.modules:
        path = REPO / "tools" / "serve_judge.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_serve_judge_token_texts_and_request_checks(tmp_path):
    import sentencepiece

    from megatron_sip.data.tokenizers import GPTSentencePieceTokenizer

    serve = _serve_judge_module()
    lines = ["the river flows to the sea and the town sleeps", "[[A]] is better than [[B]]"] * 50
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=28,
        user_defined_symbols=["[[A]]", "[[B]]"], minloglevel=2,
    )  # fmt: skip
    tokenizer = GPTSentencePieceTokenizer(str(tmp_path / "sp.model"))
    role = type("Role", (), {"tokenizer": tokenizer})()
    role.model_config = type("Model", (), {"seq_length": 32})()
    engine = serve.CompletionEngine(role, "sp")
    assert engine.token_text(tokenizer.vocab["[[A]]"]) == "[[A]]"
    spaced = tokenizer.vocab.get("\u2581the")
    if spaced is not None:
        assert engine.token_text(spaced) == " the"
    prompt, full = tokenizer.tokenize("the river"), tokenizer.tokenize("the river flows")
    assert full[: len(prompt)] == prompt
    assert engine._continuation(prompt, full[len(prompt) :]) == " flows"

    parse = serve.parse_request
    request = parse({"prompt": "x", "stop": "</r>", "logprobs": 5, "temperature": 0}, "m")
    assert request.prompts == ["x"] and request.stop == ("</r>",) and request.max_tokens == 16
    for bad, status in (
        ([1], 400), ({"max_tokens": 1}, 400), ({"prompt": 3}, 400), ({"prompt": []}, 400),
        ({"prompt": "x", "logprobs": 21}, 400), ({"prompt": "x", "max_tokens": -1}, 400),
        ({"prompt": "x", "top_p": 0}, 400), ({"prompt": "x", "n": 2}, 400),
        ({"prompt": "x", "model": "other"}, 404), ({"prompt": "x", "max_tokens": "4"}, 400),
    ):  # fmt: skip
        with pytest.raises(serve.RequestError) as error:
            parse(bad, "m")
        assert error.value.status == status, bad


def _checkpoint_and_reference(root: str, prompt_dir: str, out: str) -> None:
    """Runs in a spawned world of one: saves a tiny checkpoint and the colocated roles' answers."""
    import torch

    from megatron_sip.data.config import TokenizerConfig
    from megatron_sip.initialize import destroy_distributed
    from megatron_sip.models.checkpointing import model_metadata, save_checkpoint, unwrap_model
    from megatron_sip.roles.megatron_backend import MegatronJudge, MegatronRewriter, RoleModel

    from . import workers

    parallel, context = workers.setup()
    chunks, _ = workers.build(parallel, context)
    generator = torch.Generator().manual_seed(3)
    for param in chunks[0].parameters():  # sharper than the initialisation: no near-ties
        param.data.add_(torch.randn(param.shape, generator=generator) * 0.05)
    # A trained judge ranks its verdict tokens near the top. Imitate that with a bias: hidden
    # dimension 0 is made large for every token, and the verdicts' output rows read it.
    model = unwrap_model(chunks[0])
    model.embedding.word_embeddings.weight.data[:, 0] = 0.5
    for verdict in VERDICT_IDS:
        model.output_layer.weight.data[verdict, 0] += 3.0
    tokenizer = TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=workers.VOCAB - 1)
    save_checkpoint(root, 0, chunks, extra_common=model_metadata(workers.tiny_llama(), tokenizer))
    role = RoleModel(root, parallel, context.pg_collection)
    prompts = PromptSet.load(prompt_dir)
    judge = MegatronJudge(role, prompts)
    rewriter = MegatronRewriter(role, prompts, max_tokens=REWRITE_TOKENS)
    log_probs = role.next_token_log_probs([role.encode("31 32 33")])[0]
    results = {
        "safety": judge.safety(TINY_PREFIXES, TINY_TEXTS),
        "factuality": judge.factuality(TINY_PREFIXES, TINY_TEXTS),
        "quality": judge.quality(TINY_PREFIXES, TINY_TEXTS, TINY_REFERENCES),
        "rewrite": rewriter.rewrite(TINY_PREFIXES, TINY_TEXTS),
        "next_log_probs": log_probs[: workers.VOCAB].tolist(),
    }
    Path(out).write_text(json.dumps(results))
    destroy_distributed()


class ServerProcess:
    def __init__(self, args: list[str], env: dict):
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tools" / "serve_judge.py"), *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                return -9
        return self.process.returncode


def _http(url: str, body=None, token: str | None = None, timeout: float = 30) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_serve_judge_matches_colocated_judge(tmp_path, monkeypatch):
    from .distributed import run_ranks

    prompt_dir = tmp_path / "prompts"
    prompt_dir.mkdir()
    for name, text in TEMPLATES.items():
        (prompt_dir / name).write_text(text + "\n")
    root, reference_file = tmp_path / "ckpt", tmp_path / "reference.json"
    run_ranks(_checkpoint_and_reference, 1, str(root), str(prompt_dir), str(reference_file))
    reference = json.loads(reference_file.read_text())

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", SIP_TEST_SERVE_KEY="tiny-key", PYTHONUNBUFFERED="1")
    args = ["--load", str(root), "--port", "0", "--model-name", "tiny", "--device", "cpu",
            "--api-key-env", "SIP_TEST_SERVE_KEY"]  # fmt: skip
    server = ServerProcess(args, env)
    try:
        url = server.wait_ready(timeout=120)
        key = "tiny-key"
        assert _http(f"{url}/v1/models")[0] == 401
        status, models = _http(f"{url}/v1/models", token=key)
        assert status == 200
        assert models == {"object": "list", "data": [
            {"id": "tiny", "object": "model", "owned_by": "megatron-sip"}]}  # fmt: skip
        assert _http(f"{url}/v1/completions", b"{not json", token=key)[0] == 400
        assert _http(f"{url}/v1/completions", {"model": "tiny"}, token=key)[0] == 400
        assert _http(f"{url}/v1/completions", {"model": "x", "prompt": "1"}, token=key)[0] == 404

        # One greedy token with logprobs: the colocated model's distribution.
        body = {"model": "tiny", "prompt": "31 32 33", "max_tokens": 1, "temperature": 0,
                "logprobs": 5}  # fmt: skip
        status, answer = _http(f"{url}/v1/completions", body, token=key)
        assert status == 200 and answer["object"] == "text_completion"
        choice = answer["choices"][0]
        expected = reference["next_log_probs"]
        best = max(range(len(expected)), key=expected.__getitem__)
        assert choice["logprobs"]["tokens"] == [str(best)]
        assert choice["text"] == f" {best}" and choice["finish_reason"] == "length"
        assert choice["logprobs"]["token_logprobs"][0] == pytest.approx(expected[best], abs=1e-5)
        top = choice["logprobs"]["top_logprobs"][0]
        assert len(top) == 5
        for text, value in top.items():
            assert value == pytest.approx(expected[int(text)], abs=1e-5)
        assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}

        # Several tokens, echoed: the prompt's own log-probs come first (the first is null).
        body = {"model": "tiny", "prompt": ["31 32 33", "41 42"], "max_tokens": 4,
                "temperature": 0, "logprobs": 2, "echo": True}  # fmt: skip
        status, answer = _http(f"{url}/v1/completions", body, token=key)
        assert status == 200 and len(answer["choices"]) == 2
        first = answer["choices"][0]
        logprobs = first["logprobs"]
        assert first["text"].startswith("31 32 33 ")
        assert logprobs["tokens"][:4] == ["31", "32", "33", str(best)]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert logprobs["token_logprobs"][3] == pytest.approx(expected[best], abs=1e-4)
        assert len(logprobs["tokens"]) == len(logprobs["text_offset"]) == 3 + 4
        for token, value, alternatives in zip(
            logprobs["tokens"][3:], logprobs["token_logprobs"][3:], logprobs["top_logprobs"][3:]
        ):  # greedy: each new token is its position's most likely one
            assert value == pytest.approx(max(alternatives.values()), abs=1e-6)
            assert alternatives[token] == value

        # A stop string cuts the text (and the tokens after it).
        generated = logprobs["tokens"][3:]
        full = first["text"][len("31 32 33") :]
        body = {"prompt": "31 32 33", "max_tokens": 4, "temperature": 0, "logprobs": 0,
                "stop": [generated[2]]}  # fmt: skip
        status, answer = _http(f"{url}/v1/completions", body, token=key)
        choice = answer["choices"][0]
        assert status == 200 and choice["finish_reason"] == "stop"
        assert choice["text"] == full[: full.find(generated[2])]
        assert choice["logprobs"]["tokens"] == generated[: len(choice["logprobs"]["tokens"])]
        assert len(choice["logprobs"]["tokens"]) <= 3

        # The judge and rewriter through HTTP equal the colocated ones.
        monkeypatch.setenv("SIP_TEST_SERVE_KEY", key)
        judge = build_judge(
            JudgeConfig(
                judge_backend="openai", judge_url=url, judge_model="tiny",
                judge_api_key_env="SIP_TEST_SERVE_KEY", judge_prompt_dir=str(prompt_dir),
                judge_timeout=30, judge_max_retries=1,
            )
        )  # fmt: skip
        rewriter = build_rewriter(
            RewriterConfig(
                rewriter_backend="openai", rewriter_url=url, rewriter_model="tiny",
                rewriter_api_key_env="SIP_TEST_SERVE_KEY", rewriter_prompt_dir=str(prompt_dir),
                rewriter_max_tokens=REWRITE_TOKENS,
            )
        )  # fmt: skip
        for name, scores in (
            ("safety", judge.safety(TINY_PREFIXES, TINY_TEXTS)),
            ("factuality", judge.factuality(TINY_PREFIXES, TINY_TEXTS)),
            ("quality", judge.quality(TINY_PREFIXES, TINY_TEXTS, TINY_REFERENCES)),
        ):
            assert None not in scores, name
            assert scores == pytest.approx(reference[name], abs=1e-5), name
        assert rewriter.rewrite(TINY_PREFIXES, TINY_TEXTS) == reference["rewrite"]
        assert judge.client.stats.failures == {}
        judge.close()
        rewriter.close()
    finally:
        returncode = server.stop()
        print("".join(server.output))  # shown when the test fails
    assert returncode == 0, "".join(server.output)
