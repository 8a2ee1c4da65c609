"""The judge and rewriter behind OpenAI-compatible servers, driven by a fake that answers in
vLLM's schemas (tests/fake_vllm.py): both endpoints, chat packs rendered by the model's template or
the server, failures as counted missing scores, a deadline over whole requests, and the start-up
self-check that refuses a judge that cannot judge."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time

import pytest

from megatron_sip.errors import ConfigError, RoleCheckError
from megatron_sip.roles.config import JudgeConfig, RewriterConfig, build_judge, build_rewriter
from megatron_sip.roles.prompts import PromptSet
from megatron_sip.roles.self_check import check_judge, load_calibration

from .fake_vllm import FakeAnswer, FakeVLLM, Fault
from .hf_utils import write_tokenizer
from .pretrain_utils import ROOT

VERDICT_LOGPROBS = {"Yes": math.log(0.8), "No": math.log(0.2), "A": math.log(0.7),
                    "B": math.log(0.3)}  # fmt: skip
PLAIN_LOGPROBS = {"[[A]]": math.log(0.7), "[[B]]": math.log(0.3), "[[SAFE]]": math.log(0.8),
                  "[[UNSAFE]]": math.log(0.2), "[[YES]]": math.log(0.8),
                  "[[NO]]": math.log(0.2)}  # fmt: skip


def verdicts(prompt, body) -> FakeAnswer:
    return FakeAnswer("Yes", dict(VERDICT_LOGPROBS))


def judge_for(server, **settings):
    settings = {"judge_max_retries": 0, "judge_timeout": 5.0, **settings}
    url = server.url if server else "http://127.0.0.1:9"
    config = JudgeConfig(judge_backend="openai", judge_url=url, **settings)
    return build_judge(config)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(directory, adds_bos=True)
    return directory


def test_chat_endpoint_sends_the_packs_messages_and_reads_verdicts():
    with FakeVLLM(model="qwen", answer=verdicts) as server:
        judge = judge_for(server, judge_endpoint="chat", judge_prompt_dir="qwen")
        assert judge.client.model == "qwen"  # the one model the server lists
        assert judge.safety(["Hi."], ["Fine."]) == [pytest.approx(0.8)]
        assert judge.quality(["Hi."], ["a."], ["b."]) == [pytest.approx(0.5 * (0.7 + 0.3))]
        body = server.bodies("/v1/chat/completions")[0]
        judge.close()
    pack = PromptSet.load("qwen")
    expected = pack["safety"].render(2000, prefix="Hi.", candidate="Fine.")
    assert body["messages"] == expected.message_dicts()
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1
    assert "continue_final_message" not in body  # no prefill: the generation prompt is the answer


def test_completions_endpoint_renders_chat_packs_and_batches_prompts(tokenizer_dir):
    with FakeVLLM(model="llama", answer=verdicts) as server:
        judge = judge_for(
            server, judge_prompt_dir="llama3", judge_tokenizer=str(tokenizer_dir),
            judge_prompts_per_request=4, judge_safety_window_sentences=0,
        )  # fmt: skip
        scores = judge.factuality(["Hi."] * 6, [f"Fact {i}." for i in range(6)])
        bodies = server.bodies("/v1/completions")
        judge.close()
    assert scores == [pytest.approx(0.8)] * 6
    # Many prompts per request; the two requests run concurrently, so they may arrive in any order.
    assert sorted(len(b["prompt"]) for b in bodies) == [2, 4]
    assert all(b["add_special_tokens"] is False for b in bodies)  # the rendering holds its BOS
    from megatron_sip.data.tokenizers import HuggingFaceTokenizer

    tokenizer = HuggingFaceTokenizer(str(tokenizer_dir))
    template = PromptSet.load("llama3")["factuality"]
    rendered = template.render(2000, prefix="Hi.", candidate="Fact 0.")
    first = next(b for b in bodies if len(b["prompt"]) == 4)
    assert first["prompt"][0] == rendered.text(tokenizer)


def test_refusals_at_build_time(tokenizer_dir, tmp_path):
    with FakeVLLM(model="m", answer=verdicts) as server:
        with pytest.raises(ConfigError, match="--judge-tokenizer: pack llama3 is a chat pack"):
            judge_for(server, judge_prompt_dir="llama3")
        with pytest.raises(ConfigError, match="--judge-endpoint: chat needs a chat prompt pack"):
            judge_for(server, judge_endpoint="chat")
        with pytest.raises(ConfigError, match="pack gpt-oss: gpt-oss reasons in the Harmony"):
            judge_for(server, judge_endpoint="chat", judge_prompt_dir="gpt-oss")
        # Verdicts the served model's tokenizer splits are refused before any request.
        pack = tmp_path / "pack"
        shutil.copytree(ROOT / "megatron_sip" / "roles" / "prompts" / "qwen", pack)
        (pack / "pack.json").unlink()
        text = (pack / "quality.txt").read_text().replace("# verdicts: A B", "# verdicts: AB BA")
        (pack / "quality.txt").write_text(text)
        with pytest.raises(ConfigError, match="quality.txt: verdict 'AB' is 2 tokens"):
            judge_for(server, judge_prompt_dir=str(pack), judge_tokenizer=str(tokenizer_dir))


def test_failures_are_missing_counted_and_retried():
    faults = {0: Fault.unavailable(), 2: Fault.garbage(), 3: Fault.missing_choices(),
              4: Fault.error(404, "The model `x` does not exist.", "NotFoundError")}  # fmt: skip
    with FakeVLLM(model="m", answer=lambda p, b: FakeAnswer("x", dict(PLAIN_LOGPROBS)),
                  faults=faults) as server:  # fmt: skip
        judge = judge_for(server, judge_model="m", judge_max_retries=1,
                          judge_safety_window_sentences=0)  # fmt: skip
        retried = judge.safety(["p"], ["t"])  # 503, then answered on the retry
        garbage = judge.safety(["p"], ["t"])
        no_choices = judge.safety(["p"], ["t"])
        not_found = judge.safety(["p"], ["t"])  # a 404 is not retried
        stats = judge.client.stats
        judge.close()
    assert retried == [pytest.approx(0.8)]
    assert garbage == no_choices == not_found == [None]
    assert stats.failures == {"bad_response": 2, "http_404": 1}
    assert stats.successes == 1 and len(server.requests) == 5  # 2 + 3 completions


def test_deadline_bounds_a_dripping_server():
    with FakeVLLM(model="m", answer=verdicts, faults=Fault.drip(interval=0.5)) as server:
        judge = judge_for(server, judge_model="m", judge_timeout=1.5, judge_max_retries=0)
        start = time.monotonic()
        scores = judge.safety(["p"], ["t"])
        elapsed = time.monotonic() - start
        stats = judge.client.stats
        judge.close()
    assert scores == [None] and stats.failures == {"timeout": 1}
    assert elapsed < 3.0, elapsed


def test_bearer_token_and_concurrency(monkeypatch):
    monkeypatch.setenv("SIP_TEST_KEY", "secret")
    in_flight, peak, lock = [0], [0], threading.Lock()

    def slow(prompt, body):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.2)
        with lock:
            in_flight[0] -= 1
        return FakeAnswer("x", dict(PLAIN_LOGPROBS))

    with FakeVLLM(model="m", answer=slow, api_key="secret") as server:
        judge = judge_for(server, judge_api_key_env="SIP_TEST_KEY", judge_concurrency=3,
                          judge_prompts_per_request=1, judge_safety_window_sentences=0)  # fmt: skip
        assert judge.safety(["p"] * 9, ["t"] * 9) == [pytest.approx(0.8)] * 9
        judge.close()
        monkeypatch.setenv("SIP_TEST_KEY", "wrong")
        wrong = judge_for(server, judge_api_key_env="SIP_TEST_KEY", judge_model="m")
        assert wrong.safety(["p"], ["t"]) == [None]
        assert wrong.client.stats.failures == {"http_401": 1}
        wrong.close()
    assert peak[0] == 3


def test_self_check_refuses_a_judge_that_cannot_judge(caplog):
    calibration = load_calibration(PromptSet.load("qwen").calibration)
    # Nothing listening: every calibration score is missing, named as a connection failure.
    judge = judge_for(None, judge_prompt_dir="qwen", judge_endpoint="chat", judge_model="m")
    with pytest.raises(RoleCheckError, match=r"24 of 24 calibration tasks .* got no score.*conn"):
        check_judge(judge, _config("qwen"))
    judge.close()
    # Verdicts outside the top log-probs: unparsed, counted and shown.
    off = lambda p, b: FakeAnswer("I think", {"I": -0.1, "The": -2.5})  # noqa: E731
    with FakeVLLM(model="m", answer=off) as server:
        judge = judge_for(server, judge_prompt_dir="qwen", judge_endpoint="chat")
        with pytest.raises(RoleCheckError, match=r"unparsed verdicts: \d+.*text 'I think'"):
            check_judge(judge, _config("qwen"))
        judge.close()
    assert "holds no verdict Yes/No" in caplog.text
    # A judge that always says Yes / A: half right, below the bar; a labelled one passes.
    with FakeVLLM(model="m", answer=verdicts) as server:
        judge = judge_for(server, judge_prompt_dir="qwen", judge_endpoint="chat")
        with pytest.raises(RoleCheckError, match="accuracy 0.50 .* below --judge-min-calibrat"):
            check_judge(judge, _config("qwen"))
        judge.close()
    with FakeVLLM(model="m", answer=_knows_labels(calibration)) as server:
        judge = judge_for(server, judge_prompt_dir="qwen", judge_endpoint="chat")
        assert check_judge(judge, _config("qwen"))["overall"] == 1.0
        judge.close()


def _config(pack: str) -> JudgeConfig:
    return JudgeConfig(judge_prompt_dir=pack)


def _knows_labels(examples):
    """A fake judge that answers each calibration task right (as a good instruct model would)."""
    unsafe = [e["text"] for e in examples if e["task"] == "safety" and not e["label"]]
    false = [e["text"] for e in examples if e["task"] == "factuality" and not e["label"]]
    better = {e["a"] if e["label"] == "a" else e["b"] for e in examples if e["task"] == "pairwise"}

    def answer(messages, body):
        user = messages[-1]["content"]
        if "<candidate_a>" in user:
            first = user.split("<candidate_a>\n")[1].split("\n</candidate_a>")[0]
            return FakeAnswer("A", {"A": -0.1, "B": -3.0} if first in better else
                              {"A": -3.0, "B": -0.1})  # fmt: skip
        bad = any(text in user for text in unsafe + false)
        return FakeAnswer("No" if bad else "Yes", {"Yes": -3.0 if bad else -0.1,
                                                   "No": -0.1 if bad else -3.0})  # fmt: skip

    return answer


def test_rewriter_on_both_endpoints(tokenizer_dir):
    with FakeVLLM(model="m", answer=lambda p, b: FakeAnswer("A calm text.<|im_end|>junk")) as srv:
        chat = build_rewriter(RewriterConfig(
            rewriter_backend="openai", rewriter_url=srv.url, rewriter_endpoint="chat",
            rewriter_prompt_dir="qwen"))  # fmt: skip
        assert chat.rewrite(["Hi."], ["A rude text."]) == ["A calm text."]
        chat.close()
        plain = build_rewriter(RewriterConfig(rewriter_backend="openai", rewriter_url=srv.url,
                                              rewriter_max_tokens=32))  # fmt: skip
        assert plain.rewrite(["Hi."] * 2, ["x", "y"]) == ["A calm text.<|im_end|>junk"] * 2
        plain.close()
        bodies = srv.bodies("/v1/completions")
    assert bodies[0]["stop"] == ["</rewrite>"] and bodies[0]["max_tokens"] == 32
    assert json.dumps(bodies[0]["prompt"]).count("<rewrite>") == 2


def test_self_check_refuses_garbage_and_a_rewriter_that_cannot_rewrite():
    from megatron_sip.roles.self_check import check_rewriter

    with FakeVLLM(model="m", answer=verdicts, faults=Fault.garbage()) as server:
        judge = judge_for(server, judge_prompt_dir="qwen", judge_endpoint="chat", judge_model="m")
        with pytest.raises(RoleCheckError, match=r"got no score.*failed: bad_response"):
            check_judge(judge, _config("qwen"))
        judge.close()
        rewriter = build_rewriter(RewriterConfig(
            rewriter_backend="openai", rewriter_url=server.url, rewriter_model="m",
            rewriter_max_retries=0))  # fmt: skip
        with pytest.raises(RoleCheckError, match="2 of 2 probe rewrites did not come back"):
            check_rewriter(rewriter, None)
        rewriter.close()
