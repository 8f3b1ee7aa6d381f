#!/usr/bin/env python3
"""transformers' own figures for the shard benchmark (benchmark/benches/shard.rs runs this).

Same checkpoint, dtype and thread count as the Rust side; prompts of exactly --prompt-len
tokens (deterministic random ids, no padding), exactly --new-tokens greedy tokens each
(EOS ignored through min_new_tokens). For every batch size it prints one JSON line:

  prefill_tok_s  batch * prompt_len / (one forward of the prompt batch with use_cache=True)
  decode_tok_s   batch * (new_tokens - 1) / (generate() time - prefill time)

Usage: transformers_baseline.py [--model DIR] [--dtype float32|bfloat16|float16]
                                [--device cpu|cuda] [--threads N]
                                [--batches 1,8,32] [--prompt-len 128] [--new-tokens 128]
                                [--json-out FILE] [--quick]
"""
import argparse
import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM


# Prefill passes that may be taken again because of steal (see shard.rs's `RETAKES`).
RETAKES = 6


def steal_ticks():
    """The machine's steal time in ticks (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8])
    except (OSError, IndexError, ValueError):
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json-out")
    ap.add_argument("--quick", action="store_true", help="batch 1, 16 new tokens: a smoke test")
    a = ap.parse_args()
    if a.quick:
        a.batches, a.new_tokens = "1", 16
    torch.set_num_threads(a.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(a.device).eval()
    # A GPU runs asynchronously: each timer reads the clock after the queued work has finished.
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    records = []
    for batch in [int(b) for b in a.batches.split(",")]:
        ids = torch.randint(100, vocab, (batch, a.prompt_len), generator=gen).to(a.device)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=True)  # warm-up
            # The median of three passes, each taken again (up to RETAKES in all) when the
            # hypervisor ran someone else on our vCPUs during it, as the Rust side does.
            prefill, retaken = [], 0
            while len(prefill) < 3:
                before = steal_ticks()
                sync()
                t = time.perf_counter()
                model(input_ids=ids, attention_mask=mask, use_cache=True)
                sync()
                took = time.perf_counter() - t
                after = steal_ticks()
                if None not in (before, after) and after > before and retaken < RETAKES:
                    retaken += 1
                else:
                    prefill.append(took)
            prefill_s = statistics.median(prefill)
            sync()
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                 pad_token_id=model.config.eos_token_id)
            sync()
            generate_s = time.perf_counter() - t
        assert out.shape[1] == a.prompt_len + a.new_tokens, out.shape
        rec = {"impl": "transformers", "transformers": __import__("transformers").__version__,
               "dtype": a.dtype, "device": a.device, "threads": a.threads, "batch": batch, "prompt_len": a.prompt_len,
               "new_tokens": a.new_tokens, "prefill_tok_s": batch * a.prompt_len / prefill_s,
               "prefill_retaken": retaken,
               "decode_tok_s": batch * (a.new_tokens - 1) / max(generate_s - prefill_s, 1e-9),
               "generate_s": generate_s}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
