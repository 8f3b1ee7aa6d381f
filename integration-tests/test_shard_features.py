"""Shard features reached through the launcher's flags and the HTTP API: the watermark
(TGI-compatible green lists, checked here with torch's own generator) and RoPE overrides."""
import requests
import torch

from conftest import TINY, start

HASH_KEY = 15485863  # TGI's WatermarkLogitsProcessor


def greenlist(prev, vocab, gamma):
    g = torch.Generator(device="cpu")
    g.manual_seed(HASH_KEY * prev)
    return set(torch.randperm(vocab, generator=g)[: int(vocab * gamma)].tolist())


def generate(server, **params):
    body = {"inputs": "The assert statement", "parameters": {"max_new_tokens": 12, "details": True,
                                                             "decoder_input_details": True, **params}}
    r = requests.post(server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_watermark_biases_every_token_to_tgis_green_list():
    server = start(TINY / "tiny-llama", "--dtype", "float32",
                   "--watermark-gamma", "0.25", "--watermark-delta", "50")
    try:
        plain = generate(server)
        marked = generate(server, watermark=True)
        assert marked["generated_text"] != plain["generated_text"]
        prompt = [t["id"] for t in marked["details"]["prefill"]]
        tokens = [t["id"] for t in marked["details"]["tokens"]]
        history = prompt + tokens
        for i, tok in enumerate(tokens):
            prev = history[len(prompt) + i - 1]
            # delta 50 makes any green token beat any red one: greedy picks are all green.
            assert tok in greenlist(prev, 4096, 0.25), (i, tok)
    finally:
        assert server.stop() == 0


def test_rope_factor_override_reaches_the_shard():
    base = start(TINY / "tiny-llama", "--dtype", "float32")
    try:
        plain = generate(base)["generated_text"]
    finally:
        assert base.stop() == 0
    scaled = start(TINY / "tiny-llama", "--dtype", "float32", "--rope-factor", "4.0")
    try:
        # Linear scaling by 4 compresses every position: a random model's output changes.
        assert generate(scaled)["generated_text"] != plain
    finally:
        assert scaled.stop() == 0
