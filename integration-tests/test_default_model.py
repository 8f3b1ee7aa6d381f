"""SmolLM2-135M-Instruct (the default model) through the real launcher, driven by real clients."""
import json
from concurrent.futures import ThreadPoolExecutor

import requests
from huggingface_hub import InferenceClient
from openai import OpenAI

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


def openai_client(server):
    return OpenAI(base_url=server.url + "/v1/", api_key="-")


def test_paris_greedy(smollm2):
    r = openai_client(smollm2).chat.completions.create(model="tgi", messages=PARIS, temperature=0, max_tokens=30)
    text = r.choices[0].message.content
    assert "Paris" in text, text
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10


def test_openai_streaming_matches_non_streaming(smollm2):
    client = openai_client(smollm2)
    full = client.chat.completions.create(model="tgi", messages=PARIS, temperature=0, max_tokens=20)
    stream = client.chat.completions.create(model="tgi", messages=PARIS, temperature=0, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])


def test_huggingface_hub_chat_and_text_generation_streaming(smollm2):
    client = InferenceClient(base_url=smollm2.url)
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat_completion(messages=PARIS, max_tokens=20, temperature=0, stream=True)]
    assert "Paris" in "".join(pieces)
    events = list(client.text_generation("The capital of France is", max_new_tokens=8, stream=True, details=True))
    assert len(events) == 8
    assert [e.token.text for e in events[:-1]] and events[-1].details.finish_reason == "length"
    # InferenceClient posts to `/`, where TGI returns the prompt too for models without a
    # pipeline tag (local folders); Tessera matches that.
    assert events[-1].generated_text == "The capital of France is" + "".join(e.token.text for e in events)


def test_generate_details_and_headers(smollm2):
    r = requests.post(smollm2.url + "/generate", json={
        "inputs": "def fibonacci(n):", "parameters": {"max_new_tokens": 10, "details": True, "top_n_tokens": 2}})
    assert r.status_code == 200, r.text
    body = r.json()
    d = body["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 10 and d["seed"] is None
    assert len(d["tokens"]) == 10 and all(t["logprob"] <= 0 for t in d["tokens"])
    assert body["generated_text"] == "".join(t["text"] for t in d["tokens"])
    assert len(d["top_tokens"]) == 10 and all(len(t) == 2 for t in d["top_tokens"])
    # The chosen greedy token is the best of the top tokens.
    assert all(t["id"] == top[0]["id"] for t, top in zip(d["tokens"], d["top_tokens"]))
    assert r.headers["x-generated-tokens"] == "10"
    assert int(r.headers["x-prompt-tokens"]) > 0


def test_generate_stream_sse_format_and_utf8(smollm2):
    prompt = "Translate to German: Greetings, world! ->"
    r = requests.post(smollm2.url + "/generate_stream", stream=True, json={
        "inputs": prompt, "parameters": {"max_new_tokens": 12, "details": True, "stop": ["\n\n"]}})
    assert r.status_code == 200
    events = [json.loads(l[5:]) for l in r.iter_lines(decode_unicode=True) if l and l.startswith("data:")]
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None for e in events[:-1])
    last = events[-1]
    assert last["details"]["input_length"] > 0
    text = "".join(e["token"]["text"] for e in events)
    assert "\ufffd" not in text
    assert last["generated_text"] == text


def test_compat_route_returns_array_with_full_text(smollm2):
    r = requests.post(smollm2.url + "/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200
    body = r.json()
    assert isinstance(body, list) and body[0]["generated_text"].startswith("Hello")


def test_stop_sequence_and_seeded_sampling(smollm2):
    r = requests.post(smollm2.url + "/generate", json={
        "inputs": "Count: 1, 2, 3,", "parameters": {"max_new_tokens": 20, "stop": [" 5"], "details": True}})
    d = r.json()
    assert d["details"]["finish_reason"] == "stop_sequence", d
    assert d["generated_text"].endswith(" 5")
    params = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.9, "top_p": 0.9, "seed": 42, "details": True}
    a = requests.post(smollm2.url + "/generate", json={"inputs": "Once upon a time", "parameters": params}).json()
    b = requests.post(smollm2.url + "/generate", json={"inputs": "Once upon a time", "parameters": params}).json()
    assert a["generated_text"] == b["generated_text"] and a["details"]["seed"] == 42


def test_concurrent_requests_are_all_served(smollm2):
    prompts = [f"Write the number {i} in words:" for i in range(6)]

    def one(p):
        return requests.post(smollm2.url + "/generate",
                             json={"inputs": p, "parameters": {"max_new_tokens": 8, "details": True}}).json()

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, prompts))
    for r in results:
        d = r["details"]
        assert (d["finish_reason"], d["generated_tokens"] == 8) in [("length", True), ("eos_token", False)], r
        assert r["generated_text"] == "".join(t["text"] for t in d["tokens"] if not t["special"]), r


def test_validation_errors(smollm2):
    r = requests.post(smollm2.url + "/generate", json={"inputs": "hi", "parameters": {"temperature": 0}})
    assert r.status_code == 422
    assert r.json() == {"error": "Input validation error: `temperature` must be strictly positive", "error_type": "validation"}
    r = requests.post(smollm2.url + "/generate", json={"inputs": "", "parameters": {}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = requests.post(smollm2.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 100000}})
    assert r.status_code == 422 and "must be <=" in r.json()["error"]
    r = requests.post(smollm2.url + "/generate", data="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = requests.post(smollm2.url + "/v1/chat/completions", json={"messages": PARIS, "response_format": {"type": "json_schema"}})
    assert r.status_code == 422 and "grammar is not valid" in r.json()["error"]
    # Errors in a stream arrive as an SSE event, as in TGI.
    r = requests.post(smollm2.url + "/generate_stream", json={"inputs": "hi", "parameters": {"top_k": -1}})
    assert r.status_code == 200 and '"error_type":"validation"' in r.text


def test_info_and_health(smollm2):
    info = requests.get(smollm2.url + "/info").json()
    assert info["model_id"].endswith("SmolLM2-135M-Instruct")
    assert 0 < info["max_input_tokens"] < info["max_total_tokens"] <= 8192
    # The bf16 checkpoint runs in bf16 where the CPU computes it natively, else in f32.
    native_bf16 = "avx512_bf16" in open("/proc/cpuinfo").read().split()
    assert (info["dtype"], info["device_type"]) == ("bfloat16" if native_bf16 else "float32", "cpu")
    assert info["max_total_tokens"] <= info["max_batch_total_tokens"]
    import subprocess
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert info["sha"] == head and info["router"] == "tessera-router" and info["version"]
    assert requests.get(smollm2.url + "/health").status_code == 200
    models = openai_client(smollm2).models.list()
    assert models.data[0].id == info["model_id"]
