"""The JavaScript clients (@huggingface/inference, as ChatUI uses it, and openai) against the
real server, through `node --test integration-tests/node/clients.test.mjs`. The packages come
from integration-tests/node/package-lock.json (`make node-clients`, part of `make test`)."""
import os
import subprocess

import pytest

from conftest import ROOT

NODE = ROOT / "integration-tests" / "node"


def test_node_clients(smollm2):
    if not (NODE / "node_modules" / "openai").exists():
        pytest.fail("Node clients missing: run `make node-clients`")
    out = subprocess.run(["node", "--test", "--test-reporter=spec", "clients.test.mjs"], cwd=NODE,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TESSERA_URL": smollm2.url})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "fail 0" in out.stdout and "pass 6" in out.stdout, out.stdout[-2000:]
