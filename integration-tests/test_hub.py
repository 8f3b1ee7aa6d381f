"""`--model-id org/name` downloads from a Hub-shaped HTTP mirror (HF_ENDPOINT) started by the
test: a first download, a cache hit with HF_HUB_OFFLINE=1 and no server, and a 404 repo."""
import hashlib
import json
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from conftest import BIN, TINY, free_port, start

REPO = "tessera-test/tiny-llama"
COMMIT = "1" * 40


class Mirror(BaseHTTPRequestHandler):
    files = {}  # repo -> {name: bytes}
    downloads = []
    ranges = []  # (name, first byte asked for)

    def log_message(self, *args):
        pass

    def do_GET(self):
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", self.path)
        if m:
            repo = m.group(1)
            if repo not in self.files:
                return self.send_error(404)
            body = json.dumps({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in self.files[repo]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return self.wfile.write(body)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
        if not m or m.group(1) not in self.files or m.group(3) not in self.files[m.group(1)]:
            return self.send_error(404)
        data = self.files[m.group(1)][m.group(3)]
        start, end = 0, len(data) - 1
        r = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if r:
            start = int(r.group(1))
            end = int(r.group(2)) if r.group(2) else len(data) - 1
        if end > 0 or start > 0 or len(data) == 1:
            Mirror.downloads.append(m.group(3))
            Mirror.ranges.append((m.group(3), start))
        chunk = data[start:end + 1]
        self.send_response(206)
        self.send_header("ETag", '"%s"' % hashlib.sha256(data).hexdigest())
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        self.wfile.write(chunk)


def serve_mirror():
    Mirror.files = {REPO: {p.name: p.read_bytes() for p in (TINY / "tiny-llama").iterdir() if p.is_file()}}
    Mirror.downloads = []
    Mirror.ranges = []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Mirror)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def generate(server):
    r = requests.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5}})
    assert r.status_code == 200, r.text
    return r.json()["generated_text"]


def test_download_cache_hit_offline_and_404(tmp_path):
    mirror = serve_mirror()
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{mirror.server_address[1]}"}
    try:
        server = start(REPO, "--dtype", "float32", env=env)
        try:
            text = generate(server)
            assert requests.get(server.url + "/info").json()["model_id"] == REPO
        finally:
            assert server.stop() == 0
        assert "model.safetensors" in Mirror.downloads and "config.json" in Mirror.downloads
        snapshot = tmp_path / "hf" / "hub" / "models--tessera-test--tiny-llama" / "snapshots" / COMMIT
        assert (snapshot / "model.safetensors").exists()
        assert "Downloaded model.safetensors" in server.output()

        # Same answer as serving the local folder the mirror was made from.
        local = start(TINY / "tiny-llama", "--dtype", "float32")
        try:
            assert generate(local) == text
        finally:
            assert local.stop() == 0

        out = subprocess.run([str(BIN / "tessera-launcher"), "--model-id", "tessera-test/missing", "--port", str(free_port())],
                             capture_output=True, text=True, timeout=60, env={**__import__("os").environ, **env})
        assert out.returncode == 1
        assert out.stderr.strip().splitlines()[-1].startswith("Error: model `tessera-test/missing` was not found on the Hub (HTTP 404)")
    finally:
        mirror.shutdown()

    # The mirror is gone: offline mode serves from the cache alone.
    offline = start(REPO, "--dtype", "float32", env={**env, "HF_HUB_OFFLINE": "1"})
    try:
        assert generate(offline) == text
    finally:
        assert offline.stop() == 0
