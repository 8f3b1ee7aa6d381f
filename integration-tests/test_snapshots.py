"""Snapshots of full responses on tiny-llama (f32, greedy), so any change to a JSON shape, a
field name or an SSE framing shows up as a diff. Volatile fields (ids, timestamps, the model
path, the version in the fingerprint) are replaced and floats rounded to 3 decimals, so the
snapshots hold across machines and checkouts. Update with
`pytest integration-tests/test_snapshots.py --snapshot-update`.
"""
import json

import pytest
import requests

from conftest import TINY, start

VOLATILE = {"id": "<id>", "created": 0, "system_fingerprint": "<fingerprint>", "model": "<model path>"}


def normalise(value):
    if isinstance(value, dict):
        return {k: (VOLATILE[k] if k in VOLATILE else normalise(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, float):
        return round(value, 3)
    return value


def sse(response):
    """The data payloads of an SSE response, JSON-decoded where they are JSON."""
    out = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data:"):
            data = line[5:].strip()
            out.append(data if data == "[DONE]" else normalise(json.loads(data)))
    return out


@pytest.fixture(scope="module")
def tiny():
    s = start(TINY / "tiny-llama", "--dtype", "float32")
    yield s
    assert s.stop() == 0


CHAT = {"model": "tgi", "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is a list?"}],
        "temperature": 0, "max_tokens": 6}


def test_generate_with_details(tiny, snapshot):
    r = requests.post(tiny.url + "/generate", json={"inputs": "The quick brown fox", "parameters": {
        "max_new_tokens": 5, "details": True, "decoder_input_details": True, "top_n_tokens": 2}})
    assert normalise(r.json()) == snapshot


def test_chat_completion(tiny, snapshot):
    r = requests.post(tiny.url + "/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2})
    assert normalise(r.json()) == snapshot


def test_completion(tiny, snapshot):
    r = requests.post(tiny.url + "/v1/completions", json={"prompt": ["Hello", "The assert statement"], "max_tokens": 4,
                                                          "temperature": 0})
    body = normalise(r.json())
    body["choices"].sort(key=lambda c: c["index"])
    assert body == snapshot


def test_generate_stream(tiny, snapshot):
    r = requests.post(tiny.url + "/generate_stream", stream=True, json={"inputs": "The quick brown fox", "parameters": {
        "max_new_tokens": 4, "details": True}})
    assert sse(r) == snapshot


def test_chat_stream(tiny, snapshot):
    r = requests.post(tiny.url + "/v1/chat/completions", stream=True,
                      json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert sse(r) == snapshot


def test_completions_stream(tiny, snapshot):
    r = requests.post(tiny.url + "/v1/completions", stream=True, json={"prompt": "Hello", "max_tokens": 3, "temperature": 0,
                                                                       "stream": True})
    assert sse(r) == snapshot
