"""Security (part of the reliability issue): the API key guards every route of the OpenAPI
document, adapter ids and model ids cannot name paths, and the shard sockets are private.
"""
import os
import stat
import subprocess

import pytest
import requests

from conftest import BIN, TINY, start

OPEN = {("get", "/health"), ("get", "/ping"), ("get", "/metrics"), ("get", "/")}


@pytest.fixture(scope="module")
def keyed():
    s = start(TINY / "tiny-llama", "--dtype", "float32", "--api-key", "s3cret")
    yield s
    assert s.stop() == 0


def routes(server):
    doc = requests.get(server.url + "/api-doc/openapi.json", headers={"Authorization": "Bearer s3cret"}).json()
    return [(m, p) for p, item in doc["paths"].items() for m in item if m in ("get", "post")]


def test_every_documented_route_needs_the_key(keyed):
    checked = 0
    for method, path in routes(keyed):
        body = {"inputs": "hi", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi",
                "parameters": {"max_new_tokens": 2}, "max_tokens": 2}
        call = lambda headers: requests.request(method, keyed.url + path, json=body if method == "post" else None,
                                                headers=headers, timeout=60)
        if (method, path) in OPEN:
            assert call({}).status_code == 200, path
            continue
        for headers in ({}, {"Authorization": "Bearer S3CRET"}, {"Authorization": "Bearer s3cre"}, {"Authorization": "Bearer s3cretX"},
                        {"Authorization": "s3cret"}):
            assert call(headers).status_code == 401, (method, path, headers)
        assert call({"Authorization": "Bearer s3cret"}).status_code != 401, (method, path)
        checked += 1
    assert checked >= 10


def test_shard_sockets_are_private(keyed):
    # conftest starts every server with `--shard-uds-path {tmp}/shard`; rank 0 listens on `-0`.
    path = f"{keyed.tmp}/shard-0"
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert stat.S_ISSOCK(os.stat(path).st_mode) and mode == 0o600, oct(mode)


def test_adapter_ids_are_refused_not_resolved(keyed):
    for adapter in ("../../etc/passwd", "/etc/passwd", "org/lora"):
        r = requests.post(keyed.url + "/generate", headers={"Authorization": "Bearer s3cret"},
                          json={"inputs": "hi", "parameters": {"adapter_id": adapter}})
        assert r.status_code == 422 and "is not loaded" in r.json()["error"], r.text


@pytest.mark.parametrize("model_id,extra,message", [
    ("../../etc", [], "neither a local folder nor a Hub id"),
    ("org/..", [], "not a valid Hub id"),
    ("org/na$me", [], "not a valid Hub id"),
    ("org/name", ["--revision", "../../x"], "not a valid revision"),
])
def test_model_ids_cannot_name_paths(tmp_path, model_id, extra, message):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = subprocess.run([str(BIN / "tessera-launcher"), "--model-id", model_id, *extra, "--port", "0",
                        "--shard-uds-path", str(tmp_path / "s")], capture_output=True, text=True, timeout=60,
                       env=env, cwd=tmp_path)
    assert r.returncode != 0 and message in r.stdout + r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("config.json"))


def launch(tmp_path, *extra):
    from conftest import free_port
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    cmd = [str(BIN / "tessera-launcher"), "--model-id", str(TINY / "tiny-llama"), "--dtype", "float32",
           "--port", str(port), "--hostname", "127.0.0.1", *extra]
    return port, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_default_socket_folder_is_private(tmp_path):
    """Without --shard-uds-path the sockets go to `$TMPDIR/tessera-<uid>/`, made 0700."""
    import signal
    import time
    port, proc = launch(tmp_path)
    folder = tmp_path / f"tessera-{os.geteuid()}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(folder / "server-0").st_mode) == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_a_shared_default_socket_folder_is_refused(tmp_path):
    folder = tmp_path / f"tessera-{os.geteuid()}"
    folder.mkdir()
    folder.chmod(0o777)
    _, proc = launch(tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "is not private" in out, out
