"""Traces through the real exporter: every lab process exports with the OTLP/HTTP
exporter (the path Jaeger users take) to a receiver in this test, which decodes
the protobuf export. One failover is one trace, with the span tree the README
documents."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from hafence.lab.cluster import Lab, LabSpec
from hafence.lab.demo import failover_done

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    attributes: dict[str, object]


class OtlpReceiver:
    """POST /v1/traces with an ExportTraceServiceRequest (protobuf), as Jaeger's OTLP
    receiver takes it; every span kept."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces" and self.headers.get("Content-Type") == "application/x-protobuf"
                if ok:
                    receiver.receive(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def receive(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value") or "string_value")
                                  for a in s.attributes}
                    spans.append(Span(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                                      resource.get("service.name", ""), attributes))
        with self.lock:
            self.requests += 1
            self.spans.extend(spans)

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        thread.join(timeout=5)


class OtlpLab(Lab):
    """The lab, its processes exporting spans over OTLP/HTTP instead of to a file."""

    def __init__(self, spec: LabSpec, endpoint: str) -> None:
        super().__init__(spec)
        self.endpoint = endpoint

    def service_env(self) -> dict[str, str]:
        # The batch processor's default delay is 5 s; 200 ms keeps the test short.
        return {**super().service_env(), "HAFENCE_TRACE_EXPORTER": "otlp", "HAFENCE_TRACE_ENDPOINT": self.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "200"}


def ancestors(span: Span, by_id: dict[str, Span]) -> list[str]:
    names = []
    while span.parent_id and span.parent_id in by_id:
        span = by_id[span.parent_id]
        names.append(span.name)
    return names


async def test_one_failover_is_one_trace_with_the_documented_span_tree_over_otlp() -> None:
    with otlp_receiver() as receiver:
        lab = OtlpLab(LabSpec(heartbeat_interval_s=0.3), receiver.url)
        try:
            await lab.start()
            await lab.wait_ready()
            assert lab.config is not None
            victim = "lab-2"
            expected = {vm.name for vm in lab.config.vms_of(victim) if vm.ha}
            lab.crash(victim)
            assert await lab.observer.wait_for(lambda: failover_done(lab, victim, expected), 30), lab.diagnostics()

            root_name = f"host suspect {victim}"
            wanted = {root_name, f"arbiter fence {victim}", "fencer process fence.request", f"fence {victim}",
                      "fence level 1", f"power off bmc-{victim}",
                      *(f"start vm {vm}" for vm in expected), *(f"agent start vm {vm}" for vm in expected)}

            def arrived() -> bool:
                roots = [s for s in receiver.snapshot() if s.name == root_name]
                return bool(roots) and wanted <= {s.name for s in receiver.snapshot()
                                                  if s.trace_id == roots[0].trace_id}

            assert await lab.observer.wait_for(arrived, 15), sorted({s.name for s in receiver.snapshot()})
        finally:
            await lab.stop()  # each process flushes its batch on the way out

        spans = receiver.snapshot()
        [root] = [s for s in spans if s.name == root_name]
        assert root.parent_id == "" and root.service == "hafence-heartbeat"
        trace = [s for s in spans if s.trace_id == root.trace_id]
        by_id = {s.span_id: s for s in trace}
        # One trace per incident: every span about this incident is in it, under its one root.
        incident = root.attributes["hafence.incident"]
        assert all(s.trace_id == root.trace_id for s in spans if s.attributes.get("hafence.incident") == incident)
        assert [s.name for s in trace if not s.parent_id] == [root_name]
        assert all(root_name == ancestors(s, by_id)[-1] for s in trace if s is not root)
        assert {s.service for s in trace} == {"hafence-heartbeat", "hafence-arbiter", "hafence-fencer",
                                              "hafence-scheduler", "hafence-agent"}

        # The tree the README documents.
        def one(name: str) -> Span:
            [span] = [s for s in trace if s.name == name]
            return span

        def under(child: str, parent: str) -> bool:
            return parent in ancestors(one(child), by_id)

        assert under(f"arbiter fence {victim}", root_name)
        assert under("fencer process fence.request", f"arbiter fence {victim}")
        assert under(f"fence {victim}", "fencer process fence.request")
        assert under("fence level 1", f"fence {victim}")
        power = one(f"power off bmc-{victim}")
        assert under(power.name, "fence level 1")
        assert power.attributes["hafence.driver"] == "ipmi" and power.attributes["hafence.power_read"] == "off"
        for vm in expected:
            assert under(f"start vm {vm}", f"arbiter fence {victim}")  # started because of this fence
            assert under(f"agent start vm {vm}", f"start vm {vm}")
            assert one(f"agent start vm {vm}").service == "hafence-agent"
