#!/usr/bin/env bash
# The cargo-fuzz targets (integration-tests/fuzz), each for $1 seconds (default 60), starting
# from the seeds in the repo. New corpus entries go to .tmp/fuzz/corpus, crashes to
# .tmp/fuzz/artifacts; the script fails if any target crashed. cargo fuzz needs nightly
# features (sanitizer coverage); RUSTC_BOOTSTRAP lets the pinned stable toolchain provide them.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-60}
FUZZ_DIR=integration-tests/fuzz
TARGETS=(request_json chat_template sse_framing proto_decode)
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null; then
    [ -x .tmp/tools/bin/cargo-fuzz ] || cargo install --locked --quiet --root .tmp/tools cargo-fuzz --version 0.13.2
    export PATH="$PWD/.tmp/tools/bin:$PATH"
fi
# AddressSanitizer checks the little unsafe code there is (FFI to libtorch and CUDA) as well.
cargo fuzz build --fuzz-dir "$FUZZ_DIR" --features libfuzzer -O
failed=()
for target in "${TARGETS[@]}"; do
    mkdir -p ".tmp/fuzz/corpus/$target" ".tmp/fuzz/artifacts/$target"
    echo "== $target: ${SECONDS_PER_TARGET}s"
    status=0
    cargo fuzz run --fuzz-dir "$FUZZ_DIR" --features libfuzzer -O "$target" \
        ".tmp/fuzz/corpus/$target" "$FUZZ_DIR/corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=30 -rss_limit_mb=4096 -max_len=65536 \
        -artifact_prefix=".tmp/fuzz/artifacts/$target/" -print_final_stats=1 \
        > ".tmp/fuzz/$target.log" 2>&1 || status=$?
    grep -E "^(#[0-9]+ *DONE|stat::(number_of_executed_units|peak_rss_mb|new_units_added)|SUMMARY|Test unit written)" \
        ".tmp/fuzz/$target.log" || true
    if [ "$status" -ne 0 ]; then
        tail -30 ".tmp/fuzz/$target.log"
        failed+=("$target")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]} (logs in .tmp/fuzz, crashing inputs in .tmp/fuzz/artifacts)" >&2
    exit 1
fi
echo "no crashes"
