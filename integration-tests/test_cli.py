"""The launcher's flags: every TGI flag is understood (as a flag and as its env var), the ones
for features Tessera lacks are refused by name, TGI's invalid combinations get TGI's message,
and docs/cli.md is the current --help."""
import os
import subprocess

import pytest

from conftest import BIN, ROOT, free_port

LAUNCHER = str(BIN / "tessera-launcher")
MISSING = "/nonexistent/tessera-model"

# (flag arguments, env var, env value): accepted; the run then fails only on the missing model.
ACCEPTED = [
    (["--revision", "main"], "REVISION", "main"),
    (["--dtype", "bfloat16"], "DTYPE", "float32"),
    (["--num-shard", "1"], "NUM_SHARD", "1"),
    (["--sharded", "false"], "SHARDED", "false"),
    (["--port", "8181"], "PORT", "8181"),
    (["--hostname", "127.0.0.1"], "HOSTNAME", "127.0.0.1"),
    (["--shard-uds-path", "/tmp/x"], "SHARD_UDS_PATH", "/tmp/x"),
    (["--master-addr", "127.0.0.1"], "MASTER_ADDR", "127.0.0.1"),
    (["--master-port", "29501"], "MASTER_PORT", "29501"),
    (["--max-concurrent-requests", "8"], "MAX_CONCURRENT_REQUESTS", "8"),
    (["--max-best-of", "3"], "MAX_BEST_OF", "3"),
    (["--max-stop-sequences", "6"], "MAX_STOP_SEQUENCES", "6"),
    (["--max-top-n-tokens", "7"], "MAX_TOP_N_TOKENS", "7"),
    (["--max-input-tokens", "100"], "MAX_INPUT_TOKENS", "100"),
    (["--max-input-length", "100"], "MAX_INPUT_LENGTH", "100"),
    (["--max-total-tokens", "200"], "MAX_TOTAL_TOKENS", "200"),
    (["--max-batch-prefill-tokens", "512"], "MAX_BATCH_PREFILL_TOKENS", "512"),
    (["--max-batch-total-tokens", "4096"], "MAX_BATCH_TOTAL_TOKENS", "4096"),
    (["--max-waiting-tokens", "10"], "MAX_WAITING_TOKENS", "10"),
    (["--waiting-served-ratio", "0.5"], "WAITING_SERVED_RATIO", "0.5"),
    (["--max-batch-size", "4"], "MAX_BATCH_SIZE", "4"),
    (["--max-client-batch-size", "2"], "MAX_CLIENT_BATCH_SIZE", "2"),
    (["--payload-limit", "1000"], "PAYLOAD_LIMIT", "1000"),
    (["--validation-workers", "1"], "VALIDATION_WORKERS", "1"),
    (["--cuda-memory-fraction", "0.5"], "CUDA_MEMORY_FRACTION", "0.5"),
    (["--cuda-graphs", "0"], "CUDA_GRAPHS", "0"),
    (["--huggingface-hub-cache", "/tmp/hub"], "HUGGINGFACE_HUB_CACHE", "/tmp/hub"),
    (["--disable-custom-kernels"], "DISABLE_CUSTOM_KERNELS", "true"),
    (["--disable-grammar-support"], "DISABLE_GRAMMAR_SUPPORT", "true"),
    (["--enable-prefill-logprobs"], "ENABLE_PREFILL_LOGPROBS", "true"),
    (["--tokenizer-config-path", "/tmp/tc.json"], "TOKENIZER_CONFIG_PATH", "/tmp/tc.json"),
    (["--prometheus-port", "9100"], "PROMETHEUS_PORT", "9100"),
    (["--cors-allow-origin", "http://a"], "CORS_ALLOW_ORIGIN", "http://a"),
    (["--api-key", "k"], "API_KEY", "k"),
    (["--json-output"], "JSON_OUTPUT", "true"),
    (["--otlp-service-name", "svc"], "OTLP_SERVICE_NAME", "svc"),
    (["--otlp-endpoint", "http://127.0.0.1:4317"], "OTLP_ENDPOINT", "http://127.0.0.1:4317"),
    (["--num-shard", "2"], "NUM_SHARD", "2"),
    (["--threads-per-shard", "1"], "THREADS_PER_SHARD", "1"),
    (["--usage-stats", "off"], "USAGE_STATS", "no-stack"),
    (["--disable-usage-stats"], "DISABLE_USAGE_STATS", "true"),
    (["--graceful-termination-timeout", "5"], "GRACEFUL_TERMINATION_TIMEOUT", "5"),
    (["--max-restarts", "1"], "MAX_RESTARTS", "1"),
    (["--restart-backoff", "0.5"], "RESTART_BACKOFF", "2"),
]

# (flag arguments, env var, env value, text the error must contain).
REFUSED = [
    (["--quantize", "gptq"], "QUANTIZE", "awq", "--quantize"),
    (["--speculate", "2"], "SPECULATE", "2", "--speculate"),
    (["--kv-cache-dtype", "fp8_e5m2"], "KV_CACHE_DTYPE", "fp8_e4m3fn", "--kv-cache-dtype"),
    (["--weights-cache-override", "/x"], "WEIGHTS_CACHE_OVERRIDE", "/x", "--weights-cache-override"),
    (["--lora-adapters", "a/b"], "LORA_ADAPTERS", "a/b", "--lora-adapters"),
    (["--cuda-graphs", "1,2"], "CUDA_GRAPHS", "1,2,4", "--cuda-graphs"),
    (["--ngrok"], "NGROK", "true", "--ngrok"),
    (["--trust-remote-code"], "TRUST_REMOTE_CODE", "true", "--trust-remote-code"),
]


def run(args, env=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("HOSTNAME",)}
    full_env.update(env or {})
    port = [] if "--port" in args or "PORT" in (env or {}) else ["--port", str(free_port())]
    return subprocess.run([LAUNCHER, "--model-id", MISSING, *port, *args],
                          capture_output=True, text=True, timeout=30, env=full_env)


@pytest.mark.parametrize("args,env,value", ACCEPTED, ids=[a[0] for a, _, _ in ACCEPTED])
def test_flag_and_env_accepted(args, env, value):
    for out in (run(args), run([], {env: value})):
        assert out.returncode == 1
        assert "not found" in out.stderr, out.stderr  # got as far as looking for the model


@pytest.mark.parametrize("args,env,value,name", REFUSED, ids=[a[0] for a, _, _, _ in REFUSED])
def test_unsupported_flag_refused_by_name(args, env, value, name):
    for out in (run(args), run([], {env: value})):
        assert out.returncode == 1
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: ") and name in last, out.stderr


INVALID = [
    (["--max-input-tokens", "10", "--max-input-length", "10"],
     "Invalid argument: Both `max_input_tokens` (10) and `max_input_length` (10) are set. Please define only "
     "`max_input_tokens` as `max_input_length is deprecated for naming consistency."),
    (["--max-input-tokens", "100", "--max-total-tokens", "100"],
     "Invalid argument: `max_input_tokens`(100) must be < `max_total_tokens`(100)"),
    (["--validation-workers", "0"], "Invalid argument: `validation_workers` must be > 0"),
    (["--max-total-tokens", "300", "--max-batch-total-tokens", "200"],
     "Invalid argument: `max_total_tokens` must be <= `max_batch_total_tokens`. Given: 300 and 200"),
    (["--sharded", "true", "--num-shard", "1"], "`sharded` is true but `num_shard` <= 1"),
    (["--num-shard", "0"], "`num_shard` cannot be < 1"),
]


@pytest.mark.parametrize("args,message", INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_combinations_get_tgi_messages(args, message):
    out = run(args)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == f"Error: {message}"


def test_cli_doc_is_current():
    generated = subprocess.run(["bash", str(ROOT / "scripts" / "cli_docs.sh"), LAUNCHER],
                               capture_output=True, text=True, check=True).stdout
    assert (ROOT / "docs" / "cli.md").read_text() == generated, "run `make docs`"
    for flag in [a[0] for a, _, _ in ACCEPTED] + [a[0] for a, _, _, _ in REFUSED] + ["--model-id", "-e, --env"]:
        assert flag in generated, flag
