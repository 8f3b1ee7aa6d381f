"""The scheduler under concurrency: 64 mixed requests at once, a third of them abandoned
mid-stream, through the real launcher. Every completed output must equal what the same
request produces alone, and every KV block must come back (free or in the prefix cache)."""
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import DEFAULT_MODEL, REFS, TINY, start


def gauge(server, name):
    text = requests.get(server.url + "/metrics", timeout=10).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def generate(server, prompt, n):
    r = requests.post(server.url + "/generate", timeout=120, json={
        "inputs": prompt, "parameters": {"max_new_tokens": n, "details": True}})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def abandon(server, prompt, n):
    """Starts a stream, reads two tokens and hangs up."""
    with requests.post(server.url + "/generate_stream", stream=True, timeout=120, json={
            "inputs": prompt, "parameters": {"max_new_tokens": n}}) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                seen += 1
                if seen == 2:
                    break
    return seen


@pytest.mark.parametrize("caching", ["true", "false"])
def test_64_concurrent_with_cancellations_match_solo_and_free_every_block(caching):
    cases = json.loads((REFS / "tiny-llama.json").read_text())["cases"]
    prompts = [c["prompt"] for c in cases if c["kind"] == "text"]
    server = start(TINY / "tiny-llama", "--dtype", "float32", "--max-concurrent-requests", "128",
                   "--prefix-caching", caching)
    try:
        total = gauge(server, "tessera_kv_free_blocks") + gauge(server, "tessera_kv_cached_blocks")
        jobs = [(prompts[i % len(prompts)], 4 + (i * 7) % 29, i % 3 == 2) for i in range(64)]
        solo = {}
        for prompt, n, cancel in jobs:
            if not cancel and (prompt, n) not in solo:
                solo[(prompt, n)] = generate(server, prompt, n)
        start_line = threading.Barrier(len(jobs))

        def run(job):
            prompt, n, cancel = job
            start_line.wait()
            return abandon(server, prompt, n) if cancel else generate(server, prompt, n)

        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(run, jobs))
        for (prompt, n, cancel), got in zip(jobs, results):
            if cancel:
                assert got == 2
            else:
                assert got == solo[(prompt, n)], (prompt, n)
        # Abandoned requests leave at the next step; give the batcher a moment.
        deadline = time.time() + 30
        while time.time() < deadline:
            back = gauge(server, "tessera_kv_free_blocks") + gauge(server, "tessera_kv_cached_blocks")
            if back == total:
                break
            time.sleep(0.2)
        assert back == total, f"{total - back} KV blocks leaked"
        if caching == "true":
            # Finished prompts stay cached (evictable on demand) instead of returning to the list.
            assert gauge(server, "tessera_kv_cached_blocks") > 0, "prompts were cached for reuse"
        else:
            assert gauge(server, "tessera_kv_free_blocks") == total
    finally:
        assert server.stop() == 0


def test_prefix_cache_on_and_off_give_identical_outputs():
    cases = json.loads((REFS / "tiny-llama.json").read_text())["cases"]
    long = max((c["prompt"] for c in cases), key=len)
    outputs = []
    for flag in ("true", "false"):
        server = start(TINY / "tiny-llama", "--dtype", "float32", "--prefix-caching", flag)
        try:
            # The same long prompt three times: with the cache on, runs 2 and 3 reuse its blocks.
            outputs.append([generate(server, long, 12) for _ in range(3)])
            cached = gauge(server, "tessera_kv_cached_blocks")
            assert (cached > 0) == (flag == "true"), cached
        finally:
            assert server.stop() == 0
    assert outputs[0] == outputs[1]
    assert outputs[0][0] == outputs[0][1] == outputs[0][2]


def test_chunked_prefill_gives_the_same_tokens_and_keeps_streams_running():
    cases = json.loads((REFS / "tiny-llama.json").read_text())["cases"]
    long = max((c for c in cases if c["kind"] == "text"), key=lambda c: len(c["input_ids"]))
    assert len(long["input_ids"]) > 3 * 16
    # A prefill budget of 16 tokens: the long prompt needs several steps, and it may be longer
    # than the budget at all only because the shard continues prompts across steps.
    server = start(TINY / "tiny-llama", "--dtype", "float32", "--max-batch-prefill-tokens", "16",
                   "--max-input-tokens", "200", "--max-total-tokens", "256", "--prefix-caching", "false")
    try:
        want = long["greedy"]["ids"][:10]
        assert generate(server, long["prompt"], 10) == want
        # Six such prompts at once: they cannot share one 16-token prefill, so later ones join
        # the running batch chunk by chunk (prefill folded into its decode steps), and every
        # output stays exact.
        line = threading.Barrier(6)

        def one(_):
            line.wait()
            return generate(server, long["prompt"], 10)

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(one, range(6))) == [want] * 6
        text = requests.get(server.url + "/metrics", timeout=10).text
        assert re.search(r'^tgi_batch_concat\{reason="chunking"\} [1-9]', text, re.M), "no fused prefill"
    finally:
        assert server.stop() == 0


def test_backpressure_429_at_max_concurrent_requests():
    # The default model (tens of ms per token) so that two 400-token streams stay busy.
    server = start(DEFAULT_MODEL, "--max-concurrent-requests", "2", "--max-batch-prefill-tokens", "512",
                   "--max-input-tokens", "500", "--max-total-tokens", "1024")
    try:
        # Two long streams (ignore_eos: they cannot end early) hold both permits; a third
        # request is refused at once.
        streams = [requests.post(server.url + "/generate_stream", stream=True, timeout=60, json={
            "inputs": "Hello", "parameters": {"max_new_tokens": 400, "ignore_eos": True}}) for _ in range(2)]
        # Keep the line iterators alive: dropping one closes its connection (a disconnect).
        lines = [r.iter_lines() for r in streams]
        for r, it in zip(streams, lines):
            assert r.status_code == 200
            next(line for line in it if line.startswith(b"data:"))
        start_t = time.time()
        r = requests.post(server.url + "/generate", timeout=60, json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 429, r.text
        assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        assert time.time() - start_t < 5, "refused right away, not queued"
        for r in streams:
            r.close()
        # Once the streams are gone, requests are served again.
        deadline = time.time() + 30
        while time.time() < deadline:
            r = requests.post(server.url + "/generate", timeout=60, json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
            if r.status_code == 200:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        # A request that can never fit is refused at validation, not left waiting.
        r = requests.post(server.url + "/generate", timeout=60, json={
            "inputs": "Hi", "parameters": {"max_new_tokens": 100000}})
        assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text
    finally:
        assert server.stop() == 0
