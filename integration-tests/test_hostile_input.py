"""Hostile input (part of the reliability issue): each attack gets a clear error with the right
status code, the server stays healthy, and a victim client generating at the same time gets
exactly the text it gets on a quiet server, every time.
"""
import json
import resource
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import TINY, start

VICTIM = {"inputs": "The history of the river", "parameters": {"max_new_tokens": 48}}


@pytest.fixture(scope="module")
def server():
    s = start(TINY / "tiny-llama", "--dtype", "float32")
    yield s
    assert s.stop() == 0


class Victim(threading.Thread):
    """Generates the same greedy request over and over while the attacks run."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url, self.stop, self.results = url, threading.Event(), []
        self.expected = requests.post(url + "/generate", json=VICTIM, timeout=60).json()["generated_text"]

    def run(self):
        while not self.stop.is_set():
            try:
                r = requests.post(self.url + "/generate", json=VICTIM, timeout=60)
                self.results.append((r.status_code, r.json().get("generated_text")))
            except requests.RequestException as e:
                self.results.append((None, str(e)))

    def check(self):
        self.stop.set()
        self.join(timeout=120)
        assert self.results, "the victim never got an answer"
        bad = [r for r in self.results if r != (200, self.expected)]
        assert not bad, f"{len(bad)} of {len(self.results)} victim requests differed: {bad[:3]}"


@pytest.fixture()
def victim(server):
    v = Victim(server.url)
    v.start()
    yield v
    v.check()
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def post(server, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(server.url + path, data=data, headers={"Content-Type": "application/json"},
                         timeout=120, **kw)


CASES = [
    ("invalid UTF-8", "/generate", b'{"inputs": "\xff\xfe\xfd"}', 422, "validation"),
    ("10 MB body", "/generate", json.dumps({"inputs": "a" * 10_000_000}), 413, "request"),
    # Inside a field that takes any JSON, so the parser's recursion limit is what stops it.
    ("deeply nested JSON", "/generate",
     '{"inputs": "x", "parameters": {"grammar": {"type": "json", "value": ' + "[" * 100_000 + "]" * 100_000 + "}}}",
     422, "validation"),
    ("1M-character prompt", "/generate", {"inputs": "word " * 200_000}, 422, "validation"),
    ("max_new_tokens of 2^32", "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2 ** 32}}, 422,
     "validation"),
    ("NaN temperature", "/generate", '{"inputs": "x", "parameters": {"temperature": NaN}}', 422, "validation"),
    ("negative temperature", "/generate", {"inputs": "x", "parameters": {"temperature": -1.0}}, 422, "validation"),
    ("1,000 stop sequences", "/generate", {"inputs": "x", "parameters": {"stop": ["s%d" % i for i in range(1000)]}},
     422, "validation"),
    ("regex of catastrophic size", "/generate",
     {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "[ab]*a[ab]{40}"}}}, 422, "validation"),
    ("chat with 40,000 messages", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}] * 40_000}, 422, "validation"),
]


@pytest.mark.parametrize("name,path,body,status,kind", CASES, ids=[c[0] for c in CASES])
def test_attack_gets_a_clear_error(server, victim, name, path, body, status, kind):
    start_t = time.time()
    r = post(server, path, body)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    assert r.json()["error_type"] == kind and r.json()["error"], r.text[:300]
    assert time.time() - start_t < 60


RUNAWAY_TEMPLATES = {
    "loops": "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    "recurses": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "repeats": "{{ 'a' * 1000000000 }}",
    "allocates": "{{ range(1000000000)|list|length }}",
}


@pytest.mark.parametrize("kind", RUNAWAY_TEMPLATES)
def test_runaway_chat_template(tmp_path, kind):
    """A model whose chat template loops 10^10 times, recurses forever, repeats a string 10^9
    times or builds a list of 10^9 items: minijinja's fuel, recursion limit and size caps stop
    the render, the request gets a 422, and a victim generating on the same server meanwhile is
    not disturbed."""
    model = tmp_path / "model"
    shutil.copytree(TINY / "tiny-llama", model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = RUNAWAY_TEMPLATES[kind]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    s = start(model, "--dtype", "float32")
    try:
        victim = Victim(s.url)
        victim.start()
        while not victim.results:
            time.sleep(0.01)
        t = time.time()
        r = requests.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                          timeout=120)
        elapsed = time.time() - t
        victim.check()
        assert r.status_code == 422 and r.json()["error_type"] == "template_error", r.text[:300]
        assert elapsed < 30
        assert requests.get(s.url + "/health", timeout=10).status_code == 200
        print(f"template that {kind}: 422 in {elapsed * 1000:.0f} ms: {r.json()['error'][:120]}")
    finally:
        assert s.stop() == 0


def test_slowloris_is_cut_off(server, victim):
    """A client that sends a header byte every second is disconnected by the header timeout."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
    start_t, closed = time.time(), False
    while time.time() - start_t < 30:
        try:
            sock.sendall(b"X")
            sock.settimeout(1.0)
            if sock.recv(1024) == b"":
                closed = True
                break
        except socket.timeout:
            continue
        except OSError:
            closed = True
            break
    sock.close()
    assert closed, "the server kept a slowloris connection open for 30 s"
    assert time.time() - start_t < 20


def test_ten_thousand_idle_connections(server, victim):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 10_500:
        pytest.fail(f"this machine allows {hard} open files; the test needs 10,500")
    target = 20_000 if hard == resource.RLIM_INFINITY else min(hard, 20_000)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    conns = []
    try:
        for _ in range(10_000):
            conns.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        # Every one of them open and idle, the server still answers.
        r = requests.post(server.url + "/generate", json=VICTIM, timeout=60)
        assert r.status_code == 200 and r.json()["generated_text"] == victim.expected
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
    finally:
        for c in conns:
            c.close()
