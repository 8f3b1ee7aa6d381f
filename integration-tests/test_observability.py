"""Observability against real servers: a Prometheus server scraping Tessera, promtool, an
OTLP/gRPC trace receiver built from the official opentelemetry-proto service definitions,
the shipped Grafana dashboard's queries, and the logs.

Prometheus comes from Debian's package (`make prometheus`, part of `make test`).
"""
import json
import math
import os
import re
import secrets
import subprocess
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from conftest import ROOT, TINY, free_port, start

PROMETHEUS = ROOT / ".tmp" / "prometheus" / "usr" / "bin"
DASHBOARD = ROOT / "deploy" / "grafana" / "tessera-dashboard.json"
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)


# --- Prometheus -------------------------------------------------------------------------------

class Prometheus:
    def __init__(self, target):
        if not (PROMETHEUS / "prometheus").exists():
            pytest.fail("Prometheus missing: run `make prometheus`")
        self.dir = Path(tempfile.mkdtemp(prefix="tessera-prom-"))
        (self.dir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: tessera\n    static_configs:\n      - targets: ['{target}']\n")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [str(PROMETHEUS / "prometheus"), f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address={self.url[7:]}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError("Prometheus not ready:\n" + (self.dir / "prometheus.log").read_text())

    def query(self, expr):
        r = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def scalar(self, expr):
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr, expected, timeout=30):
        deadline = time.time() + timeout
        value = None
        while time.time() < deadline:
            value = self.scalar(expr)
            if value is not None and math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-9):
                return value
            time.sleep(0.5)
        raise AssertionError(f"{expr} = {value}, expected {expected}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def scraped():
    """A Tessera server with a separate metrics listener, and Prometheus scraping that listener."""
    metrics_port = free_port()
    server = start(TINY / "tiny-llama", "--dtype", "float32", "--prometheus-port", str(metrics_port),
                   env={"RUST_LOG": "warn"})
    prom = Prometheus(f"127.0.0.1:{metrics_port}")
    yield server, prom
    prom.stop()
    assert server.stop() == 0


def test_prometheus_sees_what_the_requests_imply(scraped):
    server, prom = scraped
    prom.wait_for('up{job="tessera"}', 1)
    generated = 0
    for _ in range(4):
        r = requests.post(server.url + "/generate", json={
            "inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 5, "details": True}})
        assert r.status_code == 200, r.text
        generated += r.json()["details"]["generated_tokens"]
    for _ in range(2):
        with requests.post(server.url + "/generate_stream", stream=True,
                           json={"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True}}) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data:")]
        generated += events[-1]["details"]["generated_tokens"]
    bad = requests.post(server.url + "/generate", json={"inputs": "x", "parameters": {"temperature": -1}})
    assert bad.status_code == 422

    prom.wait_for("tgi_request_count", 7)
    prom.wait_for("tgi_request_success", 6)
    prom.wait_for('tgi_request_failure{err="validation"}', 1)
    prom.wait_for("tgi_request_generated_tokens_sum", generated)
    # TTFT: one observation per successful request, every one under the +Inf bucket.
    prom.wait_for("tessera_request_time_to_first_token_seconds_count", 6)
    prom.wait_for('tessera_request_time_to_first_token_seconds_bucket{le="+Inf"}', 6)
    # Inter-token latency: one per token after the first.
    prom.wait_for("tessera_request_inter_token_latency_seconds_count", generated - 6)
    prom.wait_for("tessera_request_queue_time_seconds_count", 6)

    # KV blocks: the pool holds max_batch_total_tokens in blocks of 16; idle, every block is
    # free or in the prefix cache, and the repeated long prompt left blocks there.
    info = requests.get(server.url + "/info").json()
    total = math.ceil(info["max_batch_total_tokens"] / 16)
    prom.wait_for("tessera_kv_total_blocks", total)
    prom.wait_for("tessera_kv_free_blocks + tessera_kv_cached_blocks", total)
    assert prom.scalar("tessera_kv_cached_blocks") > 0
    hits = prom.scalar("tessera_prefix_cache_hit_tokens_total")
    prompts = prom.scalar("tessera_prefix_cache_prompt_tokens_total")
    assert hits >= 3 * 16, "the three repeats of the long prompt should reuse its first block"
    assert prom.scalar("tessera_prefix_cache_hit_ratio") == pytest.approx(hits / prompts)
    build = prom.query("tessera_build_info")
    assert build and build[0]["metric"]["model_id"].endswith("tiny-llama")
    assert build[0]["metric"]["device"] == "cpu" and build[0]["metric"]["world_size"] == "1"
    # RUST_LOG=warn silenced the per-request info lines.
    assert "request finished" not in server.output()


def test_grafana_dashboard_queries_run(scraped):
    server, prom = scraped
    dashboard = json.loads(DASHBOARD.read_text())
    requests.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
    exposed = requests.get(server.url + "/metrics").text
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    for expr in exprs:
        for name in re.findall(r"\b((?:tgi|tessera)_[a-z_]+)", expr):
            assert re.search(rf"^{name}[{{ ]", exposed, re.M), f"dashboard uses {name}, not exposed"
    # Every query is valid PromQL and, once Prometheus holds two scrapes of the series (rate()
    # needs them), returns data.
    deadline = time.time() + 20
    while True:
        empty = [e for e in exprs
                 if not prom.query(e.replace("$__rate_interval", "2m").replace("$instance", ".*"))]
        if not empty or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not empty, empty


def test_promtool_accepts_the_exposition(scraped):
    server, _ = scraped
    text = requests.get(server.url + "/metrics").text
    out = subprocess.run([str(PROMETHEUS / "promtool"), "check", "metrics"], input=text,
                         capture_output=True, text=True)
    # Exit 1 means the exposition did not parse; 3 means lint findings, which may only concern
    # TGI's own counter names (no `_total`), kept as they are so TGI dashboards keep working.
    assert out.returncode in (0, 3), out.stderr + out.stdout
    tgi_names = {"tgi_request_count", "tgi_request_success", "tgi_request_failure", "tgi_batch_inference_count",
                 "tgi_batch_inference_success", "tgi_batch_inference_failure", "tgi_batch_concat"}
    findings = [l for l in (out.stdout + out.stderr).splitlines() if l.strip()]
    for line in findings:
        assert line.split()[0] in tgi_names, f"promtool: {line}"
    assert "# HELP tessera_request_time_to_first_token_seconds" in text
    assert "# TYPE tessera_request_time_to_first_token_seconds histogram" in text


# --- OpenTelemetry traces ---------------------------------------------------------------------

class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC TraceService collecting every exported span with its service name."""

    def __init__(self):
        self.spans = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.spans.append((attrs, span))
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id):
        with self.lock:
            return [(a, s) for a, s in self.spans if s.trace_id.hex() == trace_id]

    def wait(self, trace_id, done, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            spans = self.trace(trace_id)
            if done(spans):
                return spans
            time.sleep(0.2)
        raise AssertionError(f"trace {trace_id} incomplete: {[(a.get('service.name'), s.name) for a, s in self.trace(trace_id)]}")


@pytest.fixture(scope="module")
def traced():
    receiver = Receiver()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    server = start(TINY / "tiny-llama", "--dtype", "float32", "--json-output",
                   "--otlp-endpoint", f"http://127.0.0.1:{port}", "--otlp-service-name", "obs-test.router",
                   env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    yield server, receiver
    assert server.stop() == 0
    grpc_server.stop(grace=None)


def names(spans, service):
    return [s.name for a, s in spans if a.get("service.name") == service]


def by_name(spans, service, name):
    return [s for a, s in spans if a.get("service.name") == service and s.name == name]


def test_traceparent_links_router_and_shard_spans(traced):
    server, receiver = traced
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    r = requests.post(server.url + "/generate", headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
                      json={"inputs": "Hello there", "parameters": {"max_new_tokens": 3, "ignore_eos": True}})
    assert r.status_code == 200, r.text

    def complete(spans):
        return (len(by_name(spans, "obs-test.shard", "decode")) >= 2
                and by_name(spans, "obs-test.router", "POST /generate")
                and by_name(spans, "obs-test.router", "infer"))

    spans = receiver.wait(trace_id, complete)
    router, shard = "obs-test.router", "obs-test.shard"
    (root,) = by_name(spans, router, "POST /generate")
    assert root.parent_span_id.hex() == parent_id, "the request span continues the caller's trace"
    assert root.kind == root.SPAN_KIND_SERVER
    (validate,) = by_name(spans, router, "validate")
    (infer,) = by_name(spans, router, "infer")
    (queue,) = by_name(spans, router, "queue")
    assert validate.parent_span_id == root.span_id and infer.parent_span_id == root.span_id
    assert queue.parent_span_id == infer.span_id
    router_prefill = by_name(spans, router, "prefill")
    router_decode = by_name(spans, router, "decode")
    assert len(router_prefill) == 1 and len(router_decode) == 2  # 3 tokens: 1 prefill + 2 decodes
    for step in router_prefill + router_decode:
        assert step.parent_span_id == infer.span_id
    # Shard spans: children of the router's step spans, through the gRPC metadata.
    (shard_prefill,) = by_name(spans, shard, "prefill")
    assert shard_prefill.parent_span_id == router_prefill[0].span_id
    decode_ids = {s.span_id for s in router_decode}
    shard_decode = by_name(spans, shard, "decode")
    assert {s.parent_span_id for s in shard_decode} == decode_ids
    rpc_ids = {s.span_id for s in [shard_prefill, *shard_decode]}
    forwards = by_name(spans, shard, "forward")
    assert len(forwards) == 3 and all(f.parent_span_id in rpc_ids for f in forwards)
    shard_attrs = [a for a, s in spans if a.get("service.name") == shard]
    assert all(a.get("tessera.rank") == "0" for a in shard_attrs)


def test_streaming_routes_stay_in_the_callers_trace(traced):
    server, receiver = traced
    for path, body in [("/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 2, "stream": True})]:
        trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
        with requests.post(server.url + path, json=body, stream=True,
                           headers={"traceparent": f"00-{trace_id}-{parent_id}-01"}) as r:
            assert r.status_code == 200
            list(r.iter_lines())
        spans = receiver.wait(trace_id, lambda s: by_name(s, "obs-test.shard", "prefill")
                              and by_name(s, "obs-test.router", "infer"))
        (root,) = by_name(spans, "obs-test.router", f"POST {path}")
        (infer,) = by_name(spans, "obs-test.router", "infer")
        assert root.parent_span_id.hex() == parent_id and infer.parent_span_id == root.span_id


def test_without_or_with_a_bad_traceparent_a_new_trace_starts(traced):
    server, receiver = traced
    for headers in [{}, {"traceparent": "ff-" + "a" * 32 + "-" + "b" * 16 + "-01"}, {"traceparent": "garbage"}]:
        marker = secrets.token_hex(4)
        r = requests.post(server.url + "/generate", headers=headers,
                          json={"inputs": f"Hello {marker}", "parameters": {"max_new_tokens": 1}})
        assert r.status_code == 200
    deadline = time.time() + 20
    while time.time() < deadline:
        with receiver.lock:
            roots = [s for a, s in receiver.spans if s.name == "POST /generate" and not s.parent_span_id]
        if len(roots) >= 3:
            break
        time.sleep(0.2)
    assert len(roots) >= 3 and len({s.trace_id for s in roots}) == len(roots)
    assert all(s.trace_id.hex() != "a" * 32 for s in roots)


def test_json_logs_and_the_per_request_line(traced):
    server, _ = traced
    r = requests.post(server.url + "/generate", json={"inputs": "Log me", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200
    deadline = time.time() + 10
    while time.time() < deadline:
        lines = [json.loads(l) for l in server.output().splitlines() if l.strip()]  # every line is JSON
        finished = [l for l in lines if l.get("message") == "request finished"]
        if finished:
            break
        time.sleep(0.2)
    line = finished[-1]
    assert line["source"] == "router" and line["level"] == "INFO"
    for key in ["request_id", "input_tokens", "generated_tokens", "finish_reason", "total_ms", "queue_ms",
                "inference_ms", "time_per_token_ms"]:
        assert key in line, key
    assert any(l.get("source", "").startswith("shard") for l in lines)
