"""Fixtures that start the real system through `tessera-launcher` and stop it with SIGTERM.

Each server gets a free port and its own shard socket path, so tests can run beside a
developer's `make run`. Teardown asserts a clean shutdown: exit code 0 after SIGTERM.
"""
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
TINY = ROOT / "models" / "tiny"
REFS = ROOT / "models" / "tiny-refs"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *extra, startup_timeout=180, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tempfile.mkdtemp(prefix="tessera-test-")
        self.log_path = Path(self.tmp) / "launcher.log"
        self.log = open(self.log_path, "wb")
        cmd = [str(BIN / "tessera-launcher"), "--model-id", str(model), "--port", str(self.port),
               "--hostname", "127.0.0.1", "--shard-uds-path", f"{self.tmp}/shard", *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError(f"server not healthy after {startup_timeout}s:\n{self.output()}")

    def output(self):
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self):
        """SIGTERM, as Ctrl-C or Kubernetes would; returns the launcher's exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def start(model, *extra, env=None):
    return Server(model, *extra, env=env)


@pytest.fixture(scope="session")
def smollm2():
    if not (DEFAULT_MODEL / "model.safetensors").exists():
        pytest.fail("default model missing: run `make model`")
    server = start(DEFAULT_MODEL)
    yield server
    code = server.stop()
    assert code == 0, f"launcher exit code after SIGTERM: {code}\n{server.output()[-3000:]}"


@pytest.fixture(scope="session")
def tiny_llama():
    if not (TINY / "tiny-llama" / "model.safetensors").exists():
        pytest.fail("test models missing: run `make test-models`")
    server = start(TINY / "tiny-llama", "--dtype", "float32")
    yield server
    code = server.stop()
    assert code == 0, f"launcher exit code after SIGTERM: {code}\n{server.output()[-3000:]}"
