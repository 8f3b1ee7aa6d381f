#!/usr/bin/env bash
# The shard's CUDA checks: its correctness suites (tests/reference, batching, grpc, nccl) with
# TESSERA_TEST_DEVICE=cuda, the whole server (launcher, router, shard) with `--device cuda`
# through integration-tests/test_tiny_models.py, then the shard benchmark with
# TESSERA_BENCH_DEVICE=cuda.
#
# A GPU machine here has no Rust toolchain and no network, so the work is split in two:
#   scripts/cuda_check.sh build   (on the development machine) builds the test and bench
#       executables against the project's venv (torch 2.11.0, the cu130 wheel) and gathers them,
#       with SmolLM2-135M's config and tokenizer, in .tmp/cuda;
#   scripts/cuda_check.sh run     (on the GPU machine, from the repo root, with .tmp/cuda,
#       models/tiny and models/tiny-refs beside it) runs them against that machine's own
#       torch 2.11.0+cu130, and writes logs to $OUT (or .tmp/cuda/out).
# SmolLM2's 269 MB of weights are too large to carry to the GPU machine, so `run` benchmarks a
# checkpoint with its exact config and tokenizer and random weights (seed 0): decode speed
# does not depend on the weights' values, since every run generates a fixed number of tokens.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=.tmp/cuda

build() {
    set -e
    export LIBTORCH_USE_PYTORCH=1
    rm -rf "$DIR" && mkdir -p "$DIR/bin" "$DIR/smollm2"
    cargo test --release --no-run --message-format=json -p tessera-shard \
        --test reference --test batching --test grpc --test nccl > "$DIR/artifacts.json"
    cargo bench --no-run --message-format=json -p tessera-benchmark --bench shard >> "$DIR/artifacts.json"
    cargo build --release -p tessera-launcher -p tessera-router -p tessera-shard --bins
    mkdir -p "$DIR/release"
    cp target/release/tessera-{launcher,router,shard} "$DIR/release/"
    # Each test and bench executable, named after its target (reference, ..., shard).
    python3 - "$DIR" <<'EOF'
import json, shutil, sys
for line in open(f"{sys.argv[1]}/artifacts.json"):
    m = json.loads(line)
    kinds = m.get("target", {}).get("kind", [])
    if m.get("reason") == "compiler-artifact" and m.get("executable") and kinds in (["test"], ["bench"]):
        shutil.copy(m["executable"], f"{sys.argv[1]}/bin/{m['target']['name']}")
EOF
    strip --strip-debug "$DIR"/bin/* "$DIR"/release/*
    # xz takes them from 90 to 20 MB: what travels to a GPU machine is limited to 64 MiB.
    tar -C "$DIR" -cf - bin release | xz -T2 -6 > "$DIR/bin.tar.xz" && rm -rf "$DIR/bin" "$DIR/release" "$DIR/artifacts.json"
    # The executables find the models through the workspace path they were built in.
    pwd > "$DIR/root"
    cp models/SmolLM2-135M-Instruct/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json} "$DIR/smollm2/"
    du -sh "$DIR" models/tiny models/tiny-refs
}

run() {
    local out=${OUT:-$DIR/out}
    mkdir -p "$out"
    local bin=/tmp/tessera-cuda-check
    rm -rf "$bin" && mkdir -p "$bin"
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$DIR/bin.tar.xz" "$bin"
    # The servers go where the integration tests look for them, unless a build is there.
    mkdir -p target/release
    for f in "$bin"/release/*; do
        [ -e "target/release/${f##*/}" ] || cp "$f" target/release/
    done
    bin=$bin/bin
    local root site
    root=$(cat "$DIR/root")
    if [ "$root" != "$PWD" ] && [ ! -e "$root" ]; then
        mkdir -p "$(dirname "$root")" && ln -s "$PWD" "$root"
    fi
    site=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
    LD_LIBRARY_PATH="$site/torch/lib:$(printf '%s:' "$site"/nvidia/*/lib)${LD_LIBRARY_PATH:-}"
    export LD_LIBRARY_PATH TESSERA_TEST_DEVICE=${TESSERA_TEST_DEVICE:-cuda} RUST_BACKTRACE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$out/gpu.txt"
    local failed=0 t
    for t in reference batching grpc nccl; do
        echo "== $t ($TESSERA_TEST_DEVICE)"
        timeout 90 "$bin/$t" --test-threads=4 --nocapture > "$out/test-$t.log" 2>&1 || { echo "FAILED: $t"; failed=1; }
        grep -E "^test |test result|panicked|max abs" "$out/test-$t.log"
    done
    echo "== whole server, --device $TESSERA_TEST_DEVICE"
    DEVICE=$TESSERA_TEST_DEVICE timeout 300 python3 -m pytest -q -p no:cacheprovider \
        integration-tests/test_tiny_models.py > "$out/test-server.log" 2>&1 || { echo "FAILED: server"; failed=1; }
    tail -3 "$out/test-server.log"
    [ "${SKIP_BENCH:-0}" = 1 ] && return $failed
    echo "== benchmark"
    local model=models/SmolLM2-135M-Instruct
    # Never over a real checkpoint (this script also runs on the development machine).
    [ -f "$model/model.safetensors" ] || { mkdir -p "$model" && cp "$DIR"/smollm2/* "$model/" && python3 - "$model" <<'EOF'; } || failed=1
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
config = AutoConfig.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1])
print("random-weight SmolLM2-135M shape:", sum(p.numel() for p in model.parameters()), "parameters")
EOF
    # benches/shard.rs runs the transformers baseline with the workspace venv's python.
    # A wrapper, not a link: a link to a venv's python3 loses that venv's packages.
    if [ ! -e .venv/bin/python ]; then
        mkdir -p .venv/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > .venv/bin/python
        chmod +x .venv/bin/python
    fi
    TESSERA_BENCH_DEVICE=${TESSERA_BENCH_DEVICE:-cuda} TESSERA_BENCH_DTYPES=${BENCH_DTYPES:-bfloat16,float16} \
        TESSERA_BENCH_JSON="$out/bench.json" timeout 330 "$bin/shard" --bench 2>&1 | tee "$out/bench.log" \
        || failed=1
    return $failed
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
