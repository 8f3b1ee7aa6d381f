"""API fuzzing: schemathesis generates requests from the served OpenAPI document and runs all
its checks on the answers (no 5xx, bodies and SSE events that conform to the documented
schemas, only documented status codes and content types, schema-valid requests accepted and
invalid ones refused). The run must find nothing, and the server must be healthy after it.

`make test` runs a fixed-seed run of at least 1,000 cases; `make fuzz` runs a larger, random
one (TESSERA_FUZZ_EXAMPLES, TESSERA_FUZZ_SEED). Settings: integration-tests/fuzz/schemathesis.toml.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import requests

from conftest import TINY, start

HERE = Path(__file__).resolve().parent
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def test_schemathesis_finds_no_failure_and_the_server_stays_healthy(tmp_path):
    server = start(TINY / "tiny-llama", "--dtype", "float32")
    try:
        examples = os.environ.get("TESSERA_FUZZ_EXAMPLES", "60")
        seed = os.environ.get("TESSERA_FUZZ_SEED", "20261125")
        cmd = [str(SCHEMATHESIS), "--config-file", str(HERE / "fuzz" / "schemathesis.toml"), "run",
               server.url + "/api-doc/openapi.json", "--checks", "all", "--max-examples", examples,
               "--workers", "2", "--no-color"]
        if seed:
            cmd += ["--seed", seed]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=tmp_path)
        out = run.stdout + run.stderr
        (HERE / "artifacts").mkdir(exist_ok=True)
        (HERE / "artifacts" / "schemathesis.txt").write_text(out)
        counts = re.search(r"(\d+) generated, (.*)", out)
        assert counts, out[-3000:]
        generated = int(counts.group(1))
        print(f"schemathesis: {counts.group(0)}")
        assert run.returncode == 0 and "failure" not in counts.group(2), out[-6000:]
        assert generated >= 1000, counts.group(0)
        # Still serving, and correctly.
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
        r = requests.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}},
                          timeout=60)
        assert r.status_code == 200 and r.json()["generated_text"]
    finally:
        assert server.stop() == 0
