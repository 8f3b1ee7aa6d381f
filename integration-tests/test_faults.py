"""Faults while streams are live (part of the reliability issue). So far: clients that hang up
mid-stream, a thousand times over.

Each test records what the clients saw, how long the server took to recover, and whether
anything leaked (KV blocks, router memory, connections); the figures go in docs/reliability.md.
"""
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from conftest import TINY, start
from test_scheduler import abandon, gauge


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def router_pid(server):
    import subprocess
    out = subprocess.run(["pgrep", "-P", str(server.proc.pid), "-f", "tessera-router"],
                         capture_output=True, text=True).stdout.split()
    return int(out[0])


def test_a_thousand_clients_hang_up_mid_stream():
    server = start(TINY / "tiny-llama", "--dtype", "float32", "--prefix-caching", "false")
    try:
        total = gauge(server, "tessera_kv_free_blocks")
        reference = requests.post(server.url + "/generate", timeout=60, json={
            "inputs": "Once upon a time", "parameters": {"max_new_tokens": 32}}).json()["generated_text"]
        pid = router_pid(server)
        # Warm up the allocators before the baseline.
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: abandon(server, f"warm-up {i}", 400), range(100)))
        rss_before = rss_kib(pid)
        started = time.time()
        with ThreadPoolExecutor(8) as pool:
            seen = list(pool.map(lambda i: abandon(server, f"Request {i}: tell me a story", 400), range(1000)))
        elapsed = time.time() - started
        assert seen == [2] * 1000, "every client got its first two tokens"
        hung_up = time.time()
        while time.time() - hung_up < 30 and gauge(server, "tessera_kv_free_blocks") != total:
            time.sleep(0.1)
        recovered = time.time() - hung_up
        assert gauge(server, "tessera_kv_free_blocks") == total, "KV blocks leaked"
        rss_after = rss_kib(pid)
        r = requests.post(server.url + "/generate", timeout=60, json={
            "inputs": "Once upon a time", "parameters": {"max_new_tokens": 32}})
        assert r.status_code == 200 and r.json()["generated_text"] == reference
        print(f"1000 hang-ups in {elapsed:.1f} s; every KV block back {recovered:.2f} s after the last; "
              f"router RSS {rss_before} -> {rss_after} KiB")
        assert rss_after - rss_before < 20_000, f"router RSS grew by {rss_after - rss_before} KiB"
    finally:
        assert server.stop() == 0
