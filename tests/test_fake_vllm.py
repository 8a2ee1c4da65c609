"""Self-test of tests/fake_vllm.py: the official ``openai`` client parses its answers (logprobs
included), its errors have vLLM's shape, and its faults misbehave as documented."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from .fake_vllm import FakeAnswer, FakeVLLM, Fault

VERDICT = FakeAnswer("Yes", {"Yes": -0.1, "No": -2.5, "Maybe": float("-inf")})


def test_openai_client_parses_completions_and_chat():
    with FakeVLLM(model="judge", answer=lambda prompt, body: VERDICT) as server:
        client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)

        completion = client.completions.create(
            model="judge",
            prompt=["first", "second"],
            max_tokens=1,
            logprobs=2,
            n=2,
            extra_body={"add_special_tokens": False},
        )
        assert [c.index for c in completion.choices] == [0, 1, 2, 3]  # prompt * n + sample
        choice = completion.choices[0]
        assert (choice.text, choice.finish_reason) == ("Yes", "length")
        assert choice.logprobs.tokens == ["Yes"]
        assert choice.logprobs.token_logprobs == [-0.1]
        assert choice.logprobs.text_offset == [0]
        # sampled token first, then the top-2 (without it): at most logprobs + 1; -inf -> -9999
        assert choice.logprobs.top_logprobs == [{"Yes": -0.1, "No": -2.5, "Maybe": -9999.0}]
        assert completion.usage.prompt_tokens == 2  # no BOS counted: add_special_tokens=False

        chat = client.chat.completions.create(
            model="judge",
            messages=[
                {"role": "user", "content": "Is it true?"},
                {"role": "assistant", "content": "Verdict:"},
            ],
            logprobs=True,
            top_logprobs=2,
            max_tokens=1,
            extra_body={
                "continue_final_message": True,
                "add_generation_prompt": False,
                "chat_template_kwargs": {"enable_thinking": False},
            },
        )
        content = chat.choices[0].logprobs.content
        assert chat.choices[0].message.content == "Yes"
        assert (content[0].token, content[0].logprob, content[0].bytes) == (
            "Yes",
            -0.1,
            [89, 101, 115],
        )
        assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [
            ("Yes", -0.1),
            ("No", -2.5),
        ]

        completions, chats = server.requests[0], server.requests[1]
        assert completions.path == "/v1/completions" and completions.body["logprobs"] == 2
        assert completions.body["add_special_tokens"] is False
        assert chats.body["chat_template_kwargs"] == {"enable_thinking": False}
        assert chats.prompt_text.endswith("<|im_start|>assistant\nVerdict:")  # left open
        assert completions.headers["authorization"] == "Bearer x"


def test_errors_have_vllm_shape():
    with FakeVLLM(model="judge", api_key="secret") as server:
        auth = {"Authorization": "Bearer secret"}
        r = httpx.post(f"{server.url}/completions", json={"model": "judge", "prompt": "a"})
        assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"})

        r = httpx.post(
            f"{server.url}/completions", json={"model": "x", "prompt": "a"}, headers=auth
        )
        assert r.status_code == 404
        assert r.json() == {
            "error": {
                "message": "The model `x` does not exist.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }
        r = httpx.post(
            f"{server.url}/completions",
            json={"prompt": " ".join(["w"] * 5000), "max_tokens": 16},
            headers=auth,
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "input_tokens"
        r = httpx.post(
            f"{server.url}/chat/completions",
            json={"messages": [{"role": "user", "content": "q"}], "continue_final_message": True},
            headers=auth,
        )
        assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"

        client = openai.OpenAI(base_url=server.url, api_key="secret", max_retries=0)
        with pytest.raises(openai.NotFoundError) as error:
            client.completions.create(model="x", prompt="a")
        assert str(error.value) == "Error code: 404 - The model `x` does not exist."
        assert (error.value.type, error.value.param, error.value.code) == (
            "NotFoundError",
            "model",
            "404",
        )

    with FakeVLLM(error_format="flat") as server:
        r = httpx.post(f"{server.url}/completions", json={"model": "x", "prompt": "a"})
        assert r.json() == {
            "object": "error",
            "message": "The model `x` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }


def test_faults():
    faults = [
        Fault.rate_limited(retry_after=0.05),
        Fault.unavailable(),
        Fault.garbage(),
        Fault.missing_choices(),
        Fault.disconnect(),
        Fault.disconnect(partial=False),
    ]
    with FakeVLLM(faults=faults) as server:
        post = lambda: httpx.post(f"{server.url}/completions", json={"prompt": "a"})  # noqa: E731
        r = post()
        assert (r.status_code, r.headers["retry-after"]) == (429, "0.05")
        assert r.json()["error"] == {
            "message": "Too Many Requests",
            "type": "Too Many Requests",
            "param": None,
            "code": 429,
        }
        assert post().status_code == 503
        with pytest.raises(json.JSONDecodeError):
            post().json()
        assert "choices" not in post().json()
        with pytest.raises(httpx.RemoteProtocolError):
            post()
        with pytest.raises(httpx.RemoteProtocolError):
            post()
        assert post().json()["choices"][0]["text"] == "ok"  # past the list: normal
        assert len(server.requests) == 7

    # the openai client retries 429 (honouring Retry-After) and 5xx, then parses the answer
    with FakeVLLM(faults=[Fault.internal_error(), Fault.rate_limited(0.05)]) as server:
        client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=2)
        assert client.completions.create(model="judge", prompt="a").choices[0].text == "ok"
        assert len(server.requests) == 3

    # a server that never answers, and one that drips: a per-read timeout catches only the first
    with FakeVLLM(faults=[Fault.hang(), Fault.drip(interval=0.1)]) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/completions", json={"prompt": "a"}, timeout=0.3)
        start, received = time.monotonic(), b""
        with httpx.stream(
            "POST", f"{server.url}/completions", json={"prompt": "a"}, timeout=0.3
        ) as r:
            for chunk in r.iter_raw():
                received += chunk
                if time.monotonic() - start > 1.0:
                    break  # 1 s in, never timed out: the whole body would take a minute
        assert r.status_code == 200 and 3 <= len(received) < 20
