"""The built-in web UI: a real browser session (Debian's Chromium through playwright-core,
`integration-tests/node/ui.test.mjs`), the first-load size, `/ui/stats` against `/metrics`, and
`--disable-ui`. Screenshots are kept in integration-tests/artifacts/ui."""
import os
import re
import shutil
import subprocess

import pytest
import requests

from conftest import DEFAULT_MODEL, ROOT, TINY, start

NODE = ROOT / "integration-tests" / "node"
SHOTS = ROOT / "integration-tests" / "artifacts" / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_browser_session():
    if not os.path.exists(CHROMIUM):
        pytest.fail("Chromium missing: run `make chromium`")
    if not (NODE / "node_modules" / "playwright-core").exists():
        pytest.fail("playwright-core missing: run `make node-clients`")
    SHOTS.mkdir(parents=True, exist_ok=True)
    server = start(DEFAULT_MODEL, "--api-key", "ui-secret", "--max-concurrent-requests", "1")
    try:
        out = subprocess.run(["node", "--test", "--test-reporter=spec", "ui.test.mjs"], cwd=NODE,
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "TESSERA_URL": server.url, "TESSERA_API_KEY": "ui-secret",
                                  "SCREENSHOTS": str(SHOTS), "TESSERA_LAUNCHER_PID": str(server.proc.pid),
                                  "CHROMIUM": CHROMIUM})
    finally:
        code = server.stop()  # the last step already sent SIGTERM; this waits for the exit
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    assert "fail 0" in out.stdout and "pass 8" in out.stdout, out.stdout[-3000:]
    assert code == 0, server.output()[-3000:]
    for name in ["chat", "complete", "dashboard", "overloaded", "phone", "down"]:
        assert (SHOTS / f"{name}.png").stat().st_size > 5000


def transferred(url):
    """Bytes on the wire for `url` with gzip accepted, and the decoded text."""
    r = requests.get(url, headers={"Accept-Encoding": "gzip"}, stream=True, timeout=10)
    assert r.status_code == 200, url
    raw = r.raw.read(decode_content=False)
    return len(raw), r


def test_first_load_is_small(tiny_llama):
    size, r = transferred(tiny_llama.url + "/ui")
    assert r.headers["content-encoding"] == "gzip"
    html = requests.get(tiny_llama.url + "/ui").text
    assets = re.findall(r'(?:src|href)="(/ui/assets/[^"]+)"', html)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets), html
    for asset in assets:
        n, r = transferred(tiny_llama.url + asset)
        assert "immutable" in r.headers["cache-control"]
        size += n
    assert size < 300_000, f"first load {size} bytes"
    assert requests.get(tiny_llama.url + "/ui/assets/missing.js").status_code == 404


def test_stats_agree_with_metrics(tiny_llama):
    for _ in range(2):
        assert requests.post(tiny_llama.url + "/generate",
                             json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}).status_code == 200
    stats = requests.get(tiny_llama.url + "/ui/stats").json()
    metrics = requests.get(tiny_llama.url + "/metrics").text

    def value(name):
        return float(re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.M).group(1))

    assert stats["requests"] == value("tgi_request_count")
    assert stats["successes"] == value("tgi_request_success")
    assert stats["kv_total_blocks"] == value("tessera_kv_total_blocks")
    assert stats["time_to_first_token"]["count"] >= 2 and stats["time_to_first_token"]["p50"] > 0


def test_disable_ui():
    server = start(TINY / "tiny-llama", "--dtype", "float32", "--disable-ui")
    try:
        assert requests.get(server.url + "/ui").status_code == 404
        assert requests.get(server.url + "/ui/stats").status_code == 404
        assert requests.get(server.url + "/health").status_code == 200
    finally:
        assert server.stop() == 0
