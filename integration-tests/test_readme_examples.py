"""The examples in README.md, run verbatim (only the port changes) against a real server.

If the README's curl or Python examples stop working, this fails: users copy them first.
"""
import re
import subprocess
import sys

from conftest import ROOT


def blocks(lang):
    text = (ROOT / "README.md").read_text()
    return [b for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S) if "localhost:8080" in b]


def test_readme_has_the_seed_examples():
    sh = "\n".join(blocks("bash"))
    py = "\n".join(blocks("python"))
    assert "/v1/chat/completions" in sh and '"stream": true' in sh
    assert "/generate" in sh
    assert "from openai import OpenAI" in py and "stream=True" in py
    assert "InferenceClient" in py


def test_curl_examples(smollm2):
    found = blocks("bash")
    assert len(found) >= 2
    for block in found:
        cmd = block.replace("localhost:8080", f"127.0.0.1:{smollm2.port}")
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        if "/v1/chat/completions" in cmd:
            events = [l for l in out.stdout.splitlines() if l.startswith("data:")]
            assert events[-1].strip() == "data: [DONE]", out.stdout[-500:]
            assert '"chat.completion.chunk"' in out.stdout
            assert len(events) > 3
        else:
            assert '"generated_text"' in out.stdout, out.stdout


def test_python_examples(smollm2):
    found = blocks("python")
    assert len(found) >= 2
    for block in found:
        code = block.replace("localhost:8080", f"127.0.0.1:{smollm2.port}")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.strip()) > 0, "example printed nothing"
