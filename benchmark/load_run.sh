#!/usr/bin/env bash
# Starts the default model on a free port and runs the HTTP load benchmark against it:
# fixed lengths at concurrency 1/8/32/64 and a Poisson rate, ShareGPT-like lengths, and the
# router-overhead comparison (same batches straight to the shard). Results in bench-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=bench-out
mkdir -p "$OUT"
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
SOCK=$(mktemp -d)/shard
cargo build --release -p tessera-benchmark --example shard_direct
target/release/tessera-launcher --model-id models/SmolLM2-135M-Instruct --port "$PORT" \
  --hostname 127.0.0.1 --shard-uds-path "$SOCK" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
$PY benchmark/load.py --url "http://127.0.0.1:$PORT" --concurrency 1,8,32,64 --rates 2 --dist fixed \
  --requests 64 --shard-socket "$SOCK-0" --json-out "$OUT/load-fixed.json" --plot "$OUT/load-fixed.png"
$PY benchmark/load.py --url "http://127.0.0.1:$PORT" --concurrency 8,32 --dist sharegpt --requests 48 \
  --json-out "$OUT/load-sharegpt.json" --plot "$OUT/load-sharegpt.png"
