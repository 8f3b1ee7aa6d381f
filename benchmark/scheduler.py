#!/usr/bin/env python3
"""Scheduler benchmarks through the real launcher and HTTP API (default model, CPU).

prefix    N requests share a ~1,000-token system prompt and differ in their question. Time to
          first token (streamed) with the prefix cache on and off, in the same run. The first
          request of each run fills the cache, so the figure is the median over the others.
chunking  Four streams decode steadily; a ~4,000-token prompt is injected. Reports the worst
          inter-token gap of the running streams while it is prefilled: with chunked prefill
          (prefill budget 512: the prompt enters in chunks folded into decode steps) and without
          (PREFILL_CHUNKING=0, budget 4096: one prompt must fit one prefill, so the running
          streams wait for all of it).

Usage: .venv/bin/python benchmark/scheduler.py [prefix|chunking|all] [--requests N] [--json-out FILE]
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "target" / "release" / "tessera-launcher"
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
SENTENCE = "The quick brown fox jumps over the lazy dog while the patient owl keeps watch. "


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tmp = tempfile.mkdtemp(prefix="tessera-bench-")
        cmd = [str(LAUNCHER), "--model-id", str(MODEL), "--port", str(self.port), "--hostname", "127.0.0.1",
               "--shard-uds-path", f"{tmp}/shard", *args]
        self.log = open(f"{tmp}/launcher.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"launcher exited: see {tmp}/launcher.log")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        sys.exit("server did not become healthy")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)

    def tokens(self, text):
        return len(requests.post(self.url + "/tokenize", json={"inputs": text}, timeout=60).json())

    def stream(self, prompt, max_new, on_token=None):
        """Streams one request; returns the arrival time of every token."""
        times = []
        with requests.post(self.url + "/generate_stream", stream=True, timeout=600, json={
                "inputs": prompt, "parameters": {"max_new_tokens": max_new}}) as r:
            for line in r.iter_lines():
                if line.startswith(b"data:"):
                    times.append(time.perf_counter())
                    if on_token:
                        on_token()
        return times


def stream_load(server, concurrency, n, max_new):
    """Streams `n` requests, `concurrency` at a time: (tokens/s, median inter-token gap in ms)."""
    gaps, tokens = [], 0
    lock = threading.Lock()

    def one(i):
        nonlocal tokens
        times = server.stream(f"Request {i}: tell me a story about the sea.", max_new)
        with lock:
            gaps.extend(b - a for a, b in zip(times, times[1:]))
            tokens += len(times)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    return tokens / (time.perf_counter() - start), statistics.median(gaps) * 1e3


def prefix(n):
    system = SENTENCE * 60
    out = {}
    for cache in ("true", "false"):
        server = Server("--prefix-caching", cache)
        try:
            prompt_tokens = server.tokens(system)
            ttfts = []
            for i in range(n):
                prompt = f"{system}\nQuestion {i}: what does animal number {i} do?\nAnswer:"
                start = time.perf_counter()
                times = server.stream(prompt, 2)
                ttfts.append(times[0] - start)
            out[cache] = {"system_prompt_tokens": prompt_tokens, "ttft_s": ttfts,
                          "median_ttft_s": statistics.median(ttfts[1:])}
        finally:
            server.stop()
        print(f"prefix cache {cache}: system prompt {out[cache]['system_prompt_tokens']} tokens, "
              f"median TTFT {out[cache]['median_ttft_s'] * 1e3:.0f} ms over requests 2..{n}", flush=True)
    ratio = out["false"]["median_ttft_s"] / out["true"]["median_ttft_s"]
    print(f"prefix cache: TTFT {ratio:.1f}x lower with the cache on", flush=True)
    return {"runs": out, "ttft_ratio_off_over_on": ratio}


def chunking():
    big = SENTENCE * 240
    out = {}
    for mode, args, env in (("chunked", ["--max-batch-prefill-tokens", "512"], {}),
                            ("not chunked", ["--max-batch-prefill-tokens", "4096"], {"PREFILL_CHUNKING": "0"})):
        server = Server("--max-input-tokens", "4000", "--max-total-tokens", "4500",
                        "--prefix-caching", "false", *args, env=env)
        try:
            big_tokens = server.tokens(big)
            streams, threads = [], []
            started = threading.Barrier(5)
            for i in range(4):
                times = []
                streams.append(times)
                prompt = f"Story {i}. Once upon a time, in a kingdom by the sea, there lived"

                def run(p=prompt, t=times):
                    started.wait()
                    t.extend(server.stream(p, 400))

                threads.append(threading.Thread(target=run))
            for t in threads:
                t.start()
            started.wait()
            time.sleep(3.0)
            inject = time.perf_counter()
            done = server.stream(big, 1)[0]
            for t in threads:
                t.join()
            gaps = []
            for times in streams:
                gaps += [b - a for a, b in zip(times, times[1:]) if b >= inject and a <= done + 0.5]
            steady = [b - a for times in streams for a, b in zip(times, times[1:]) if b < inject]
            out[mode] = {"prompt_tokens": big_tokens, "prefill_s": done - inject,
                         "worst_itl_s": max(gaps) if gaps else None,
                         "median_itl_before_s": statistics.median(steady) if steady else None}
        finally:
            server.stop()
        r = out[mode]
        print(f"{mode}: {r['prompt_tokens']}-token prompt injected, first token after {r['prefill_s']:.2f} s; "
              f"worst inter-token gap of the running streams {r['worst_itl_s'] * 1e3:.0f} ms "
              f"(median before: {r['median_itl_before_s'] * 1e3:.0f} ms)", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("which", nargs="?", default="all", choices=["prefix", "chunking", "all"])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--json-out")
    a = ap.parse_args()
    if not (MODEL / "model.safetensors").exists():
        sys.exit("run `make model` first")
    results = {}
    if a.which in ("prefix", "all"):
        results["prefix"] = prefix(a.requests)
    if a.which in ("chunking", "all"):
        results["chunking"] = chunking()
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
