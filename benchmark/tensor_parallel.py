#!/usr/bin/env python3
"""Decode throughput with 1 shard against N tensor-parallel shards (CPU, shared-memory
collectives), measured in the same run on the same machine.

tiny-llama splits across 2 shards; SmolLM2-135M (9 heads) across 3. On a 2-core machine
there is little to gain: N ranks share 2 cores, and every layer adds two all-reduces. The
figures are what this machine gives, not a claim about bigger hosts.

Usage: .venv/bin/python benchmark/tensor_parallel.py [--requests N] [--max-new-tokens N]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scheduler  # noqa: E402  (the launcher wrapper shared with the scheduler benchmarks)

MODELS = [("tiny-llama", scheduler.ROOT / "models" / "tiny" / "tiny-llama", 2),
          ("SmolLM2-135M", scheduler.MODEL, 3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    print("| model | shards | concurrency | tokens/s | median ITL | tokens/s vs 1 shard |")
    print("|---|---|---|---|---|---|")
    for name, path, n in MODELS:
        scheduler.MODEL = path
        base = {}
        for shards in (1, n):
            server = scheduler.Server("--dtype", "float32", "--num-shard", str(shards))
            try:
                scheduler.stream_load(server, 2, 2, 4)  # warm up
                for c in (1, 4):
                    tps, itl = scheduler.stream_load(server, c, args.requests, args.max_new_tokens)
                    base.setdefault(c, tps)
                    print(f"| {name} | {shards} | {c} | {tps:.1f} | {itl:.1f} ms | {tps / base[c]:.2f}x |", flush=True)
            finally:
                server.stop()


if __name__ == "__main__":
    main()
