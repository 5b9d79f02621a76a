"""Tracing set-up and W3C trace-context propagation through NATS headers.

One incident is one trace: the span that declares a host suspect is the root,
and every hop carries ``traceparent`` in its NATS headers. Exporters: ``none``,
``console``, ``otlp`` (OTLP over HTTP, e.g. to Jaeger) and ``jsonl`` (one span
per line in a file, which the lab and the tests read back).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from hafence.config import TelemetrySection

JSONL_FLUSH_MS = 100


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a file, one JSON object per line."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            lines.append(
                json.dumps(
                    {
                        "trace_id": format(ctx.trace_id, "032x"),
                        "span_id": format(ctx.span_id, "016x"),
                        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
                        "name": span.name,
                        "service": span.resource.attributes.get("service.name"),
                        "start_ns": span.start_time,
                        "end_ns": span.end_time,
                        "status": span.status.status_code.name,
                        "attributes": dict(span.attributes or {}),
                    },
                    default=str,
                )
            )
        with self._lock, open(self._path, "a") as f:
            f.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def setup_tracing(service: str, settings: TelemetrySection, instance: str = "") -> TracerProvider:
    """Install a tracer provider for this process. Environment overrides config:
    HAFENCE_TRACE_EXPORTER and HAFENCE_TRACE_ENDPOINT (the lab uses them)."""
    exporter_name = os.environ.get("HAFENCE_TRACE_EXPORTER", settings.exporter)
    endpoint = os.environ.get("HAFENCE_TRACE_ENDPOINT", settings.endpoint)
    attributes = {"service.name": f"hafence-{service}", "service.namespace": "hafence"}
    if instance:
        attributes["service.instance.id"] = instance
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter_name == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif exporter_name == "jsonl":
        if not endpoint:
            raise ValueError("telemetry.exporter = 'jsonl' needs telemetry.endpoint (a file path)")
        # Batched, off the event loop: a synchronous file write per span cost the
        # scheduler ~15 ms per failover wave (issue 12). Spans reach the file within
        # JSONL_FLUSH_MS, and all of them at shutdown.
        provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(endpoint),
                                                       schedule_delay_millis=JSONL_FLUSH_MS))
    elif exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    elif exporter_name != "none":
        raise ValueError(f"unknown trace exporter {exporter_name!r} (none, console, otlp, jsonl)")
    trace.set_tracer_provider(provider)
    return provider


def tracer() -> trace.Tracer:
    return trace.get_tracer("hafence")


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current span's context (traceparent, tracestate)."""
    carrier: dict[str, str] = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    return propagate.extract(dict(headers or {}))


def trace_id_of(headers: Mapping[str, str] | None) -> str:
    """The trace id in a message's traceparent header, or ''."""
    parent = (headers or {}).get("traceparent", "")
    parts = parent.split("-")
    return parts[1] if len(parts) == 4 else ""
