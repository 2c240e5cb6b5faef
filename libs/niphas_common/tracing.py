"""OpenTelemetry set-up and trace propagation through NATS headers.

A tracer provider is always installed so every published event carries a `traceparent`
(one trace from the forge's push to the mounted closure); spans are exported only when
`OTEL_EXPORTER_OTLP_ENDPOINT` is set (or an exporter is passed, as tests do).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SimpleSpanProcessor

TRACER_NAME = "niphas"
_installed: TracerProvider | None = None


def setup_tracing(service_name: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Install the process's tracer provider once; later calls may add an exporter."""
    global _installed
    if _installed is None:
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        _installed = provider
    if exporter is not None:
        _installed.add_span_processor(SimpleSpanProcessor(exporter))
    return _installed


def shutdown_tracing() -> None:
    if _installed is not None:
        _installed.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Write the current trace context (`traceparent`, `tracestate`) into `headers`."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    """The trace context a message's headers carry (empty context when none)."""
    return propagate.extract(dict(headers or {}))
