"""Routes beyond generate and chat: OpenAI completions, tokenization, SageMaker's
/invocations, the payload limit, the API key and CORS."""
import json

import pytest
import requests
from openai import OpenAI

from conftest import TINY, start


def test_openai_completions(smollm2):
    client = OpenAI(base_url=smollm2.url + "/v1/", api_key="-")
    r = client.completions.create(model="tgi", prompt=["def add(a, b):", "The capital of France is"], max_tokens=6, temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.text and c.finish_reason in ("length", "stop") for c in r.choices)
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    greedy = requests.post(smollm2.url + "/generate", json={"inputs": "The capital of France is",
                                                            "parameters": {"max_new_tokens": 6}}).json()
    assert [c.text for c in r.choices if c.index == 1] == [greedy["generated_text"]]
    raw = requests.post(smollm2.url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2, "temperature": 0})
    for h in ["x-compute-type", "x-compute-time", "x-compute-characters", "x-total-time", "x-validation-time",
              "x-queue-time", "x-inference-time", "x-time-per-token", "x-prompt-tokens", "x-generated-tokens"]:
        assert h in raw.headers, h
    assert float(raw.headers["x-generated-tokens"]) == raw.json()["usage"]["completion_tokens"]


def test_openai_completions_streaming(smollm2):
    client = OpenAI(base_url=smollm2.url + "/v1/", api_key="-")
    chunks = list(client.completions.create(model="tgi", prompt=["a", "b"], max_tokens=4, temperature=0, stream=True))
    by_index = {0: "", 1: ""}
    finals = {}
    for c in chunks:
        for choice in c.choices:
            by_index[choice.index] += choice.text
            if choice.finish_reason:
                finals[choice.index] = choice.finish_reason
    assert set(finals) == {0, 1} and set(finals.values()) <= {"length", "stop"}
    full = client.completions.create(model="tgi", prompt=["a", "b"], max_tokens=4, temperature=0)
    assert {c.index: c.text for c in full.choices} == by_index


def test_completions_errors(smollm2):
    r = requests.post(smollm2.url + "/v1/completions", json={"prompt": "a", "suffix": "b"})
    assert r.status_code == 422 and r.json()["error_type"] == "suffix not supported"
    r = requests.post(smollm2.url + "/v1/completions", json={"prompt": ["a"] * 5})
    assert r.status_code == 422
    assert r.json()["error"] == "Number of prompts exceeds the maximum allowed batch size of 4"
    r = requests.post(smollm2.url + "/v1/completions", json={"prompt": []})
    assert r.status_code == 422


def test_tokenize_and_chat_tokenize(smollm2):
    text = "Hello, world! def f(x): return x"
    toks = requests.post(smollm2.url + "/tokenize", json={"inputs": text}).json()
    assert "".join(t["text"] for t in toks) == text
    assert [t["start"] for t in toks[1:]] == [t["stop"] for t in toks[:-1]]
    # Offsets are byte offsets; a token holding part of a character maps to the whole character.
    text = "Grüße, 世界!"
    toks = requests.post(smollm2.url + "/tokenize", json={"inputs": text}).json()
    assert toks[0]["start"] == 0 and toks[-1]["stop"] == len(text.encode())
    assert all(text.encode()[t["start"]:t["stop"]].decode() == t["text"] for t in toks)
    r = requests.post(smollm2.url + "/chat_tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert r["templated_text"].endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in r["templated_text"]
    assert len(r["tokenize_response"]) > 3


def test_invocations_dispatches_on_fields(smollm2):
    url = smollm2.url + "/invocations"
    r = requests.post(url, json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and isinstance(r.json(), list)
    r = requests.post(url, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.json()["object"] == "chat.completion"
    r = requests.post(url, json={"prompt": "Hi", "max_tokens": 2})
    assert r.json()["object"] == "text_completion"
    r = requests.post(url, json={"nothing": 1})
    assert r.status_code == 422


def test_presence_penalty_changes_greedy_output(smollm2):
    client = OpenAI(base_url=smollm2.url + "/v1/", api_key="-")
    msgs = [{"role": "user", "content": "Repeat the word cat ten times."}]
    plain = client.chat.completions.create(model="tgi", messages=msgs, temperature=0, max_tokens=20, logprobs=True)
    penalised = client.chat.completions.create(model="tgi", messages=msgs, temperature=0, max_tokens=20, logprobs=True,
                                               presence_penalty=2.0)
    a, b = plain.choices[0].logprobs.content, penalised.choices[0].logprobs.content
    # The first step whose greedy choice repeats an earlier generated token is where the penalty
    # bites: before it both runs agree; there the token changes or its logprob drops.
    seen = set()
    first_repeat = next(i for i, t in enumerate(a) if t.token in seen or seen.add(t.token))
    assert [t.token for t in a[:first_repeat]] == [t.token for t in b[:first_repeat]]
    at_a, at_b = a[first_repeat], b[first_repeat]
    assert at_b.token != at_a.token or at_b.logprob < at_a.logprob - 1.0, (at_a, at_b)
    r = requests.post(smollm2.url + "/v1/chat/completions", json={"messages": msgs, "presence_penalty": 3})
    assert r.status_code == 422 and "presence_penalty" in r.json()["error"]


def test_payload_limit(smollm2):
    r = requests.post(smollm2.url + "/generate", json={"inputs": "a" * 2_100_000})
    assert r.status_code == 413


@pytest.fixture(scope="module")
def keyed():
    server = start(TINY / "tiny-llama", "--dtype", "float32", "--api-key", "s3cret",
                   "--cors-allow-origin", "http://ui.example")
    yield server
    assert server.stop() == 0


PROTECTED = [
    ("post", "/", {"inputs": "Hello", "parameters": {"max_new_tokens": 1}}),
    ("post", "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 1}}),
    ("post", "/generate_stream", {"inputs": "Hello", "parameters": {"max_new_tokens": 1}}),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
    ("post", "/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
    ("post", "/invocations", {"inputs": "Hello", "parameters": {"max_new_tokens": 1}}),
    ("post", "/tokenize", {"inputs": "Hello"}),
    ("post", "/chat_tokenize", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("get", "/info", None),
    ("get", "/v1/models", None),
]


@pytest.mark.parametrize("method,path,body", PROTECTED)
def test_api_key_protects_route(keyed, method, path, body):
    url = keyed.url + path
    assert getattr(requests, method)(url, json=body).status_code == 401
    bad = {"Authorization": "Bearer S3CRET"}
    assert getattr(requests, method)(url, json=body, headers=bad).status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    assert getattr(requests, method)(url, json=body, headers=good).status_code == 200


def test_api_key_leaves_probes_open_and_cors_allows_authorization(keyed):
    assert requests.get(keyed.url + "/health").status_code == 200
    assert requests.get(keyed.url + "/").status_code == 200
    r = requests.options(keyed.url + "/generate", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.headers.get("access-control-allow-origin") == "http://ui.example"
    assert "authorization" in r.headers.get("access-control-allow-headers", "").lower()
    r = requests.options(keyed.url + "/generate", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    client = OpenAI(base_url=keyed.url + "/v1/", api_key="s3cret")
    assert client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_tools_reach_the_template(smollm2):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    # SmolLM2's template cannot render tools, so they follow the last message as text (as in TGI).
    r = requests.post(smollm2.url + "/chat_tokenize", json={"messages": msgs, "tools": TOOLS}).json()
    assert '"get_weather"' in r["templated_text"] and "Given the functions available" in r["templated_text"]
    r = requests.post(smollm2.url + "/chat_tokenize", json={"messages": msgs, "tools": TOOLS, "tool_choice": "none"}).json()
    assert "get_weather" not in r["templated_text"]
    r = requests.post(smollm2.url + "/v1/chat/completions", json={"messages": msgs, "tools": TOOLS, "tool_choice": "none",
                                                                  "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    # A budget too small for any call: the cut-off text comes back as content, not as a broken call.
    r = requests.post(smollm2.url + "/v1/chat/completions", json={"messages": msgs, "tools": TOOLS, "max_tokens": 3,
                                                                  "tool_choice": "required"})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["choices"][0]["message"]["content"] and "tool_calls" not in r.json()["choices"][0]["message"]
    # Earlier tool calls and tool answers are accepted in the conversation.
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "0", "content": "21 C"}]
    r = requests.post(smollm2.url + "/v1/chat/completions", json={"messages": history, "max_tokens": 3})
    assert r.status_code == 200, r.text
