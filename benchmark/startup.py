#!/usr/bin/env python3
"""Start-up time of the default model: from launching `tessera-launcher` until `/health`
answers 200, median of N runs, split into shard load + warmup as the launcher logs them.

Run: `make bench` (or `.venv/bin/python benchmark/startup.py [N]`).
"""
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
    except OSError:
        return False


def one_run():
    port, tmp = free_port(), tempfile.mkdtemp()
    log = open(os.path.join(tmp, "log"), "w+")
    start = time.perf_counter()
    proc = subprocess.Popen([os.path.join(ROOT, "target", "release", "tessera-launcher"), "--model-id", MODEL,
                             "--port", str(port), "--hostname", "127.0.0.1", "--shard-uds-path", f"{tmp}/s"],
                            stdout=log, stderr=subprocess.STDOUT)
    while not healthy(port):
        if proc.poll() is not None or time.perf_counter() - start > 300:
            raise SystemExit("server did not start")
        time.sleep(0.05)
    total = time.perf_counter() - start
    # The run dtype depends on the CPU (f32 where it has no native bf16).
    dtype = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=5))["dtype"]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    log.seek(0)
    shard = float(re.search(r"Shard ready in ([0-9.]+)s", log.read()).group(1))
    return total, shard, dtype


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    runs = [one_run() for _ in range(n)]
    total = statistics.median(r[0] for r in runs)
    shard = statistics.median(r[1] for r in runs)
    print(f"startup of SmolLM2-135M-Instruct ({runs[0][2]}), median of {n}: {total:.2f} s to /health 200 "
          f"(shard load {shard:.2f} s, router warmup and the rest {total - shard:.2f} s)")


if __name__ == "__main__":
    main()
