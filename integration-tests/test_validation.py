"""One test per validation rule of TGI (tgi-compat §3.4): status code and exact message.

The server runs tiny-llama with --max-input-tokens 100 --max-total-tokens 300, so that the
input-length and total-length rules can each be reached on their own.
"""
import pytest
import requests

from conftest import TINY, start


@pytest.fixture(scope="module")
def server():
    s = start(TINY / "tiny-llama", "--dtype", "float32", "--max-input-tokens", "100", "--max-total-tokens", "300")
    yield s
    assert s.stop() == 0


def tokens(server, text):
    return len(requests.post(server.url + "/tokenize", json={"inputs": text}).json())


RULES = [
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"temperature": 0.0}, "`temperature` must be strictly positive"),
    ({"temperature": -1.0}, "`temperature` must be strictly positive"),
    ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"frequency_penalty": -2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 1.5}, "`top_p` must be > 0.0 and <= 1.0"),
    ({"top_p": 0.0}, "`top_p` must be > 0.0 and <= 1.0"),
    ({"typical_p": 0.0}, "`typical_p` must be > 0.0 and <= 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"truncate": 0}, "`truncate` must be strictly positive and less than 100. Given: 0"),
    ({"truncate": 101}, "`truncate` must be strictly positive and less than 100. Given: 101"),
    ({"grammar": {"type": "regex", "value": "(a+"}}, "grammar is not valid: invalid regex: unclosed group"),
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
]


@pytest.mark.parametrize("params,message", RULES, ids=[m for _, m in RULES])
def test_rule(server, params, message):
    r = requests.post(server.url + "/generate", json={"inputs": "Hello", "parameters": params})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation"
    assert r.json()["error"].startswith(f"Input validation error: {message}"), r.text


def test_empty_inputs(server):
    r = requests.post(server.url + "/generate", json={"inputs": "", "parameters": {}})
    assert r.status_code == 422
    assert r.json()["error"] == "Input validation error: `inputs` cannot be empty"


def test_total_tokens(server):
    n = tokens(server, "Hello world")
    r = requests.post(server.url + "/generate", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 299}})
    assert r.status_code == 422
    assert r.json()["error"] == (f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 300. "
                                 f"Given: {n} `inputs` tokens and 299 `max_new_tokens`")


def test_input_length_and_truncation(server):
    text = "word " * 150
    n = tokens(server, text)
    assert n > 100
    r = requests.post(server.url + "/generate", json={"inputs": text, "parameters": {"max_new_tokens": 5}})
    assert r.status_code == 422
    assert r.json()["error"] == f"Input validation error: `inputs` must have less than 100 tokens. Given: {n}"
    # Truncation keeps the last tokens, and then the request fits.
    r = requests.post(server.url + "/generate", json={"inputs": text, "parameters": {"max_new_tokens": 5, "truncate": 50,
                                                                                      "decoder_input_details": True}})
    assert r.status_code == 200, r.text
    prefill = r.json()["details"]["prefill"]
    assert len(prefill) == 50 and "".join(t["text"] for t in prefill).strip().startswith("word")


def test_stream_only_rules(server):
    for params, message in [({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not supported when streaming tokens"),
                            ({"decoder_input_details": True}, "`decoder_input_details` == true is not supported when streaming tokens")]:
        r = requests.post(server.url + "/generate_stream", json={"inputs": "Hello", "parameters": params})
        assert r.status_code == 200
        assert f'"error":"Input validation error: {message}"' in r.text


def test_best_of_returns_the_best_candidate(server):
    r = requests.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {
        "best_of": 2, "do_sample": True, "max_new_tokens": 6, "details": True}})
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    others = d["best_of_sequences"]
    assert len(others) == 1
    mean = lambda toks: sum(t["logprob"] for t in toks) / len(toks)  # noqa: E731
    assert mean(d["tokens"]) >= mean(others[0]["tokens"])
    assert d["seed"] != others[0]["seed"]


def test_chat_n_and_completions_n(server):
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "/v1/", api_key="-")
    r = client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=5,
                                       temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1, "samples should differ"
    again = client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=5,
                                           temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    stream = client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=5,
                                            temperature=1.0, seed=7, stream=True)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {0: r.choices[0].message.content, 1: r.choices[1].message.content}
    c = client.completions.create(model="tgi", prompt=["a", "b"], n=2, max_tokens=3, temperature=1.0, seed=1)
    assert sorted(x.index for x in c.choices) == [0, 1, 2, 3]
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "n": 0})
    assert r.status_code == 422


def test_bad_json_names_the_field(server):
    r = requests.post(server.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": "ten"}})
    assert r.status_code == 422
    assert "parameters: max_new_tokens" in r.json()["error"] and r.json()["error_type"] == "validation"
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [{"type": "video"}]}]})
    assert r.status_code == 422 and "messages: [0].content" in r.json()["error"]
    # Objects must be objects: serde would take an array for a struct, field by field.
    r = requests.post(server.url + "/generate", json={"inputs": "Hi", "parameters": [None, None]})
    assert r.status_code == 422 and "expected a map" in r.json()["error"], r.text
    r = requests.post(server.url + "/generate", json={"parameters": {}})
    assert r.status_code == 422 and "inputs" in r.json()["error"]
    r = requests.post(server.url + "/generate", data='{"inputs": "Hi",}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = requests.post(server.url + "/generate", data='{"inputs": "Hi"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


def test_fixed_tgi_quirks(server):
    # top_p = 1.0 means "no nucleus filtering" (TGI refuses it; OpenAI clients send it).
    r = requests.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {"top_p": 1.0, "max_new_tokens": 2}})
    assert r.status_code == 200, r.text
    # A missing `parameters` object means the same defaults as `{}`: greedy, so deterministic.
    a = requests.post(server.url + "/generate", json={"inputs": "Hello"}).json()
    b = requests.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {}}).json()
    assert a == b
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                                  "logit_bias": {"5": 10}})
    assert r.status_code == 422 and "logit_bias" in r.json()["error"]
