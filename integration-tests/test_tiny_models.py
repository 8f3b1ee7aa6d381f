"""Greedy output over HTTP equals transformers' `generate()` for the tiny checkpoints, with all
reference prompts sent at once so they run as one continuous batch."""
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import REFS, TINY, start


def shard_environ(server):
    pids = subprocess.run(["pgrep", "-f", f"tessera-shard serve .*--uds-path {server.tmp}/shard"],
                          capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, pids
    with open(f"/proc/{pids[0]}/environ", "rb") as f:
        return dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)


# The last case runs every op on libtorch: `--disable-custom-kernels` turns off the shard's CPU
# decode kernels (TGI's flag for its custom CUDA kernels).
@pytest.mark.parametrize("model,extra", [("tiny-llama", []), ("tiny-mistral", []), ("tiny-qwen2", []),
                                         ("tiny-llama", ["--disable-custom-kernels"])],
                         ids=["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-llama-no-kernels"])
def test_concurrent_greedy_matches_transformers_generate(model, extra):
    refs = json.loads((REFS / f"{model}.json").read_text())
    server = start(TINY / model, "--dtype", "float32", *extra)
    try:
        assert (shard_environ(server).get(b"TESSERA_NO_KERNELS") == b"1") == bool(extra)
        # scripts/cuda_check.sh runs this file with DEVICE=cuda (the launcher's `--device`).
        device = os.environ.get("DEVICE", "auto")
        if device != "auto":
            info = requests.get(server.url + "/info", timeout=10).json()
            assert info["device_type"] == device.split(":")[0], info
        def one(case):
            if case["kind"] == "chat":
                body = {"messages": case["messages"], "temperature": 0, "max_tokens": refs["new_tokens"], "logprobs": True}
                r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
                choice = r["choices"][0]
                return choice["finish_reason"], [c["token"] for c in choice["logprobs"]["content"]], choice["message"]["content"]
            body = {"inputs": case["prompt"], "parameters": {"max_new_tokens": refs["new_tokens"], "details": True}}
            r = requests.post(server.url + "/generate", json=body, timeout=120).json()
            d = r["details"]
            return d["finish_reason"], [t["id"] for t in d["tokens"]], r["generated_text"]

        cases = refs["cases"]
        with ThreadPoolExecutor(len(cases)) as pool:
            results = list(pool.map(one, cases))
        for case, (finish, tokens, text) in zip(cases, results):
            want = case["generate"]
            if case["kind"] == "chat":
                # Chat reports token texts, not ids; compare the decoded text instead.
                assert text == want["text_skip_special"], case["messages"]
                assert finish == ("stop" if want["finish_reason"] == "eos_token" else "length")
            else:
                assert tokens == want["ids"], case["prompt"]
                assert finish == want["finish_reason"], case["prompt"]
                assert text == want["text_skip_special"], case["prompt"]
    finally:
        assert server.stop() == 0
