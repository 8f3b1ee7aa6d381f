"""Every client page in docs/clients runs as written (only the port changes) against the real
default model: curl, the openai and huggingface_hub Python clients, LangChain, the JavaScript
clients, the Gradio chat app (driven by gradio_client while it streams) and ChatUI's snippet."""
import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
import requests
from gradio_client import Client

from conftest import ROOT, free_port

DOCS = ROOT / "docs" / "clients"
NODE = ROOT / "integration-tests" / "node"


def blocks(page, lang):
    return re.findall(rf"```{lang}\n(.*?)```", (DOCS / page).read_text(), re.S)


def local(code, server):
    return code.replace("http://localhost:8080", server.url)


def test_every_client_has_a_page():
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages >= {"curl.md", "openai-python.md", "huggingface-hub.md", "javascript.md", "langchain.md",
                     "gradio.md", "chatui.md"}


def test_curl_page(smollm2):
    found = blocks("curl.md", "bash")
    assert len(found) == 3
    for block in found:
        out = subprocess.run(["bash", "-c", local(block, smollm2)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        if "generate_stream" in block or '"stream": true' in block:
            events = [l for l in out.stdout.splitlines() if l.startswith("data:")]
            assert len(events) > 2, out.stdout
        else:
            assert json.loads(out.stdout)["details"]["generated_tokens"] > 0


@pytest.mark.parametrize("page", ["openai-python.md", "huggingface-hub.md", "langchain.md"])
def test_python_pages(smollm2, page):
    (block,) = blocks(page, "python")
    out = subprocess.run([sys.executable, "-c", local(block, smollm2)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [l for l in out.stdout.splitlines() if l.strip()]
    assert len(lines) >= 2, out.stdout
    if page != "huggingface-hub.md":  # the greedy chat answer of SmolLM2
        assert "Paris" in out.stdout, out.stdout


def test_javascript_page(smollm2):
    (block,) = blocks("javascript.md", "js")
    script = NODE / f"doc-{uuid.uuid4().hex}.mjs"  # inside the package, to resolve its modules
    script.write_text(local(block, smollm2))
    try:
        out = subprocess.run(["node", script.name], cwd=NODE, capture_output=True, text=True, timeout=120)
    finally:
        script.unlink()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Paris" in out.stdout, out.stdout


def test_gradio_page_streams_through_gradio_client(smollm2, tmp_path):
    app_code, driver = blocks("gradio.md", "python")
    port = free_port()
    (tmp_path / "chat.py").write_text(local(app_code, smollm2))
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(tmp_path / "gradio.log", "wb")
    app = subprocess.Popen([sys.executable, "chat.py"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 120
        while time.time() < deadline:
            assert app.poll() is None, (tmp_path / "gradio.log").read_text()
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        # The page's own driver, as written.
        out = subprocess.run([sys.executable, "-c", driver.replace("http://127.0.0.1:7860/", url)],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip()
        # And the stream itself: several growing partial answers, as a user sees them.
        api_name = re.search(r'api_name="([^"]+)"', driver).group(1)
        job = Client(url, verbose=False).submit("What is the capital of France?", api_name=api_name)
        partials = [p for p in job if p]
        assert len(partials) >= 3, partials
        for shorter, longer in zip(partials, partials[1:]):
            assert longer.startswith(shorter)
        assert job.outputs()[-1] == partials[-1]
    finally:
        app.terminate()
        app.wait(timeout=30)
        log.close()


def test_chatui_snippet_matches_the_tested_calls():
    (env,) = blocks("chatui.md", "env")
    models = json.loads(re.search(r"MODELS=`(.*)`", env, re.S).group(1))
    types = {e["type"]: e for m in models for e in m["endpoints"]}
    assert types["openai"]["baseURL"] == "http://localhost:8080/v1"
    assert types["tgi"]["url"] == "http://localhost:8080"
    tgi_model = next(m for m in models if m["endpoints"][0]["type"] == "tgi")
    # The node test renders the prompt exactly as this template does for one user turn.
    assert "<|im_start|>assistant\n" in tgi_model["chatPromptTemplate"]
    test_js = (NODE / "clients.test.mjs").read_text()
    assert "<|im_start|>user\\n${PROMPT}<|im_end|>\\n<|im_start|>assistant\\n" in test_js
    assert "model: url" in test_js and "textGenerationStream" in test_js
