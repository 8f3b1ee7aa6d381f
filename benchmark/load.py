#!/usr/bin/env python3
"""HTTP load generator for a running Tessera (or TGI) server.

Drives `/generate_stream` at fixed concurrencies and at Poisson arrival rates, with prompt and
output lengths drawn from a fixed or a ShareGPT-like distribution (synthesised: log-normal
prompt and output lengths with ShareGPT's rough medians, since no dataset can be downloaded
here). For every load point it reports TTFT, ITL (gaps between streamed tokens), TPOT (time per
output token after the first) and end-to-end latency at p50/p90/p99, plus request and token
throughput; with a progress bar, a JSON file of every figure, and a PNG plot of throughput
against latency.

Usage:
  .venv/bin/python benchmark/load.py --url http://127.0.0.1:8080 \\
      [--concurrency 1,8,32,64] [--rates 1,4] [--dist fixed|sharegpt] [--requests 64] \\
      [--json-out load.json] [--plot load.png]
"""
import argparse
import asyncio
import json
import math
import random
import statistics
import time

import aiohttp
from tqdm import tqdm

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact").split()


def percentile(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def workload(dist, n, seed=0):
    """(prompt, max_new_tokens) pairs. One word is about one token for these words. The fixed
    prompts are built exactly as benchmark/examples/shard_direct.rs builds them."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if dist == "fixed":
            words = [WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(128)]
            new = 64
        else:  # ShareGPT-like: heavy-tailed prompts (median ~100), outputs (median ~100)
            prompt_len = int(min(1500, max(4, rng.lognormvariate(math.log(100), 1.0))))
            new = int(min(400, max(4, rng.lognormvariate(math.log(100), 0.8))))
            words = [rng.choice(WORDS) for _ in range(prompt_len)]
        out.append((f"Request {i}: " + " ".join(words), new))
    return out


async def one(session, url, prompt, new):
    """Streams one request; returns its timings (None on error)."""
    start = time.perf_counter()
    times = []
    body = {"inputs": prompt, "parameters": {"max_new_tokens": new}}
    try:
        async with session.post(url + "/generate_stream", json=body) as r:
            if r.status != 200:
                return {"error": r.status}
            async for line in r.content:
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    if "error" in event:
                        return {"error": event["error"]}
                    times.append(time.perf_counter())
    except aiohttp.ClientError as e:
        return {"error": str(e)}
    if not times:
        return {"error": "no tokens"}
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"ttft": times[0] - start, "e2e": times[-1] - start, "tokens": len(times), "itl": gaps,
            "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None}


async def run_point(url, jobs, concurrency=None, rate=None, label=""):
    results = []
    bar = tqdm(total=len(jobs), desc=label, unit="req", leave=False)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.perf_counter()
        if concurrency:
            queue = list(jobs)

            async def worker():
                while queue:
                    prompt, new = queue.pop()
                    results.append(await one(session, url, prompt, new))
                    bar.update()

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng = random.Random(1)
            tasks = []
            for prompt, new in jobs:
                async def fire(p=prompt, n=new):
                    results.append(await one(session, url, p, n))
                    bar.update()
                tasks.append(asyncio.create_task(fire()))
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    bar.close()
    ok = [r for r in results if "error" not in r]
    summary = {"label": label, "concurrency": concurrency, "rate": rate, "requests": len(results),
               "errors": len(results) - len(ok), "seconds": elapsed,
               "requests_per_s": len(ok) / elapsed, "output_tok_per_s": sum(r["tokens"] for r in ok) / elapsed}
    for key in ("ttft", "tpot", "e2e"):
        xs = [r[key] for r in ok if r[key] is not None]
        summary[key] = {f"p{p}": percentile(xs, p) for p in (50, 90, 99)}
    itl = [g for r in ok for g in r["itl"]]
    summary["itl"] = {f"p{p}": percentile(itl, p) for p in (50, 90, 99)}
    return summary


def show(s):
    ms = lambda d, p: f"{d[p] * 1e3:.0f}" if d[p] is not None else "-"
    print(f"| {s['label']} | {s['requests_per_s']:.2f} | {s['output_tok_per_s']:.1f} | "
          f"{ms(s['ttft'], 'p50')}/{ms(s['ttft'], 'p90')}/{ms(s['ttft'], 'p99')} | "
          f"{ms(s['itl'], 'p50')}/{ms(s['itl'], 'p90')}/{ms(s['itl'], 'p99')} | "
          f"{ms(s['tpot'], 'p50')}/{ms(s['tpot'], 'p90')}/{ms(s['tpot'], 'p99')} | "
          f"{ms(s['e2e'], 'p50')}/{ms(s['e2e'], 'p90')}/{ms(s['e2e'], 'p99')} | {s['errors']} |", flush=True)


def router_overhead(url, socket, n=16):
    """The same 16 single-request batches through the router (concurrency 1) and straight to
    the shard over gRPC; the difference is what the router adds."""
    import subprocess
    from pathlib import Path
    jobs = workload("fixed", n)
    via_router = asyncio.run(run_point(url, jobs, concurrency=1, label="router, concurrency 1"))
    info = json.loads(__import__("urllib.request").request.urlopen(url + "/info").read())
    first_block = info["max_batch_total_tokens"] // 16 - 64  # blocks the idle router does not use
    binary = Path(__file__).resolve().parent.parent / "target/release/examples/shard_direct"
    out = subprocess.run([str(binary), socket, str(first_block), str(n), "64"], check=True,
                         capture_output=True, text=True).stdout
    direct = json.loads(out.strip().splitlines()[-1])
    result = {"router_median_e2e_s": via_router["e2e"]["p50"], "shard_median_e2e_s": direct["median_e2e_s"],
              "router_median_tpot_s": via_router["tpot"]["p50"], "shard_median_tpot_s": direct["median_tpot_s"]}
    result["per_request_s"] = result["router_median_e2e_s"] - result["shard_median_e2e_s"]
    result["per_token_s"] = result["router_median_tpot_s"] - result["shard_median_tpot_s"]
    print(f"router overhead: {result['per_request_s'] * 1e3:.1f} ms per request "
          f"(e2e {result['router_median_e2e_s'] * 1e3:.0f} vs {result['shard_median_e2e_s'] * 1e3:.0f} ms), "
          f"{result['per_token_s'] * 1e3:.2f} ms per token "
          f"(TPOT {result['router_median_tpot_s'] * 1e3:.2f} vs {result['shard_median_tpot_s'] * 1e3:.2f} ms)",
          flush=True)
    return result


def plot(points, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker, name in (("concurrency", "o-", "fixed concurrency"), ("rate", "s--", "Poisson rate (req/s)")):
        pts = [p for p in points if p[kind]]
        if pts:
            ax.plot([p["e2e"]["p50"] for p in pts], [p["output_tok_per_s"] for p in pts], marker, label=name)
            for p in pts:
                ax.annotate(str(p[kind]), (p["e2e"]["p50"], p["output_tok_per_s"]), fontsize=8)
    ax.set_xlabel("median end-to-end latency (s)")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Tessera: throughput against latency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--rates", default="", help="Poisson arrival rates in requests/s, e.g. 1,4")
    ap.add_argument("--dist", default="fixed", choices=["fixed", "sharegpt"])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--json-out")
    ap.add_argument("--plot")
    ap.add_argument("--shard-socket", help="the shard's socket ({--shard-uds-path}-0): measure the router's overhead")
    a = ap.parse_args()
    jobs = workload(a.dist, a.requests)
    points = []
    print("| load | req/s | out tok/s | TTFT p50/90/99 ms | ITL p50/90/99 ms | TPOT p50/90/99 ms | e2e p50/90/99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for c in [int(x) for x in a.concurrency.split(",") if x]:
        s = asyncio.run(run_point(a.url, jobs, concurrency=c, label=f"{a.dist}, concurrency {c}"))
        points.append(s)
        show(s)
    for r in [float(x) for x in a.rates.split(",") if x]:
        s = asyncio.run(run_point(a.url, jobs, rate=r, label=f"{a.dist}, Poisson {r}/s"))
        points.append(s)
        show(s)
    overhead = router_overhead(a.url, a.shard_socket) if a.shard_socket else None
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"dist": a.dist, "requests": a.requests, "points": points, "router_overhead": overhead},
                      f, indent=1)
    if a.plot:
        plot(points, a.plot)


if __name__ == "__main__":
    main()
