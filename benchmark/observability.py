#!/usr/bin/env python3
"""What tracing costs: the same streamed workload with OTLP export off and on, in one run.

Every request, batch step and shard call makes spans whether or not they are exported; with
`--otlp-endpoint` they are also batched and sent over gRPC (here to a local receiver that
keeps them, as a collector would). Reports the median inter-token latency and the throughput
at concurrency 1 and 8, and their ratio on/off. The tiny model is the worst case (its forward
takes about a millisecond, so per-step overhead shows most); the default model is the usual one.

Usage: .venv/bin/python benchmark/observability.py [--model tiny|default] [--requests N] [--json-out FILE]
"""
import argparse
import json
import sys
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scheduler  # noqa: E402  (the launcher wrapper shared with the scheduler benchmarks)

MODELS = {"tiny": scheduler.ROOT / "models" / "tiny" / "tiny-llama", "default": scheduler.MODEL}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans = 0

    def Export(self, request, context):
        self.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=MODELS, default="tiny")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    scheduler.MODEL = MODELS[args.model]
    receiver = Receiver()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    results = {}
    for mode, extra in (("off", []), ("on", ["--otlp-endpoint", f"http://127.0.0.1:{port}"])):
        server = scheduler.Server("--dtype", "float32", *extra)
        try:
            scheduler.stream_load(server, 2, 4, 4)  # warm up
            results[mode] = {}
            for c in (1, 8):
                tps, itl = scheduler.stream_load(server, c, args.requests, args.max_new_tokens)
                results[mode][c] = {"median_itl_ms": itl, "tokens_per_s": tps}
        finally:
            server.stop()
        for c, r in results[mode].items():
            print(f"OTLP {mode:3}: concurrency {c}: median ITL {r['median_itl_ms']:.2f} ms, "
                  f"{r['tokens_per_s']:.1f} tokens/s", flush=True)
    grpc_server.stop(grace=1)
    for c in (1, 8):
        on, off = results["on"][c], results["off"][c]
        print(f"concurrency {c}: ITL on/off {on['median_itl_ms'] / off['median_itl_ms']:.3f}, "
              f"throughput on/off {on['tokens_per_s'] / off['tokens_per_s']:.3f}", flush=True)
    print(f"spans exported: {receiver.spans}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": args.model, "results": results,
                                                   "spans_exported": receiver.spans}, indent=2))


if __name__ == "__main__":
    main()
