"""The launcher's failure modes: bad input gives one readable line and exit code 1; a dying
child takes the service down with a message naming it; SIGTERM stops everything with 0."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import BIN, TINY, free_port, start


def launch(*args, timeout=60):
    return subprocess.run([str(BIN / "tessera-launcher"), *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(out):
    assert out.returncode == 1, out
    err = out.stderr.strip()
    assert "panicked" not in err and "RUST_BACKTRACE" not in err, err
    assert err.splitlines()[-1].startswith("Error: "), err


def test_missing_model_path(tmp_path):
    out = launch("--model-id", str(tmp_path / "nope"), "--port", str(free_port()))
    assert_one_line_error(out)
    assert "not found" in out.stderr


def test_typo_in_a_local_path_is_not_sent_to_the_hub():
    out = launch("--model-id", "models/no-such-model", "--port", str(free_port()))
    assert_one_line_error(out)
    assert "neither a local folder nor a Hub id" in out.stderr


def test_malformed_config(tmp_path):
    model = tmp_path / "broken"
    shutil.copytree(TINY / "tiny-llama", model)
    (model / "config.json").write_text("{ this is not json")
    out = launch("--model-id", str(model), "--port", str(free_port()), "--shard-uds-path", str(tmp_path / "s"))
    assert_one_line_error(out)
    assert "malformed" in out.stderr and "config.json" in out.stderr


def test_unsupported_architecture_names_the_shard(tmp_path):
    model = tmp_path / "bloom"
    shutil.copytree(TINY / "tiny-llama", model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "bloom"
    (model / "config.json").write_text(json.dumps(cfg))
    out = launch("--model-id", str(model), "--port", str(free_port()), "--shard-uds-path", str(tmp_path / "s"))
    assert_one_line_error(out)
    # The message names the architecture and lists the supported ones.
    assert "shard 0" in out.stderr and "bloom" in out.stderr
    assert "qwen3" in out.stderr and "gemma2" in out.stderr


def test_busy_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = launch("--model-id", str(TINY / "tiny-llama"), "--hostname", "127.0.0.1", "--port", str(port),
                     "--shard-uds-path", str(tmp_path / "s"))
    assert_one_line_error(out)
    assert str(port) in out.stderr


def test_invalid_argument_combination(tmp_path):
    out = launch("--model-id", str(TINY / "tiny-llama"), "--max-input-tokens", "100", "--max-total-tokens", "50")
    assert_one_line_error(out)
    assert "Invalid argument" in out.stderr


def shard_pid(server):
    pids = subprocess.run(["pgrep", "-f", f"tessera-shard serve .*--uds-path {server.tmp}/shard"],
                          capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, pids
    return int(pids[0])


def test_dead_shard_without_restarts_stops_everything():
    server = start(TINY / "tiny-llama", "--dtype", "float32", "--max-restarts", "0")
    os.kill(shard_pid(server), signal.SIGKILL)
    code = server.proc.wait(timeout=30)
    assert code == 1
    out = server.output()
    assert "shard 0 exited unexpectedly (signal 9 (SIGKILL))" in out, out[-2000:]
    assert "giving up after 0 restarts" in out
    router = subprocess.run(["pgrep", "-f", f"tessera-router .*{server.tmp}/shard"], capture_output=True, text=True)
    assert router.stdout.strip() == "", "router left running"


def test_two_instances_side_by_side_and_sigint():
    a = start(TINY / "tiny-llama", "--dtype", "float32")
    b = start(TINY / "tiny-qwen2", "--dtype", "float32")
    try:
        import requests
        for s in (a, b):
            r = requests.post(s.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
            assert r.status_code == 200
    finally:
        b.proc.send_signal(signal.SIGINT)
        assert b.proc.wait(timeout=60) == 0
        assert a.stop() == 0


def stream_events(response):
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data:"):
            yield json.loads(line[5:])


def test_killed_shard_is_restarted_and_service_heals():
    import requests
    server = start(TINY / "tiny-llama", "--dtype", "float32")
    try:
        first = shard_pid(server)
        r = requests.post(server.url + "/generate_stream", stream=True, timeout=60,
                          json={"inputs": "Hello", "parameters": {"max_new_tokens": 400}})
        events = stream_events(r)
        assert "token" in next(events)
        os.kill(first, signal.SIGKILL)
        rest = list(events)
        # The stream caught in the crash ends with an error event, not silently.
        assert rest and "error" in rest[-1] and rest[-1]["error_type"] == "generation", rest[-1:]
        statuses = []
        deadline = time.time() + 60
        while time.time() < deadline:
            statuses.append(requests.get(server.url + "/health", timeout=10).status_code)
            if statuses[-1] == 200:
                break
            time.sleep(0.2)
        assert statuses[-1] == 200 and 503 in statuses, statuses
        r = requests.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200
        assert shard_pid(server) != first
        assert server.proc.poll() is None, "the launcher must keep running"
        assert "restarting the shards in 1.0s (restart 1 of 3)" in server.output()
    finally:
        assert server.stop() == 0


def test_sigterm_lets_an_active_stream_finish():
    import requests
    server = start(TINY / "tiny-llama", "--dtype", "float32")
    # This prompt runs tiny-llama to the length limit (no EOS within 300 tokens).
    r = requests.post(server.url + "/generate_stream", stream=True, timeout=60,
                      json={"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 300, "details": True}})
    events = stream_events(r)
    assert "token" in next(events)
    server.proc.send_signal(signal.SIGTERM)
    rest = list(events)
    assert rest[-1]["generated_text"] is not None and rest[-1]["index"] == 300, rest[-1]
    assert rest[-1]["details"]["finish_reason"] == "length"
    assert server.proc.wait(timeout=60) == 0
    server.log.close()
