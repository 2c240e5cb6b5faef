"""OpenTelemetry set-up and trace propagation through NATS headers.

A tracer provider is always installed, so every published event carries a `traceparent` (one
trace from the forge's push to the mounted closure). Spans are recorded only while something
exports them: `OTEL_EXPORTER_OTLP_ENDPOINT` set, or an exporter passed in (tests). Otherwise
tracing is off: spans are not recorded, but trace ids are still made and propagated, at a
fraction of a recorded span's cost.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache

from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

TRACER_NAME = "niphas"


class _WhileExporting(Sampler):
    """Record every span once an exporter is attached; none before."""

    def __init__(self) -> None:
        self.exporting = False

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        decision = Decision.RECORD_AND_SAMPLE if self.exporting else Decision.DROP
        return SamplingResult(decision, attributes if self.exporting else None, trace_state)

    def get_description(self) -> str:
        return "NiphasWhileExporting"


_sampler = _WhileExporting()
_installed: TracerProvider | None = None
_ids = RandomIdGenerator()  # new traces' ids before a provider is installed


def setup_tracing(service_name: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Install the process's tracer provider once; later calls may add an exporter."""
    global _installed
    if _installed is None:
        provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}), sampler=_sampler
        )
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            _sampler.exporting = True
        trace.set_tracer_provider(provider)
        _installed = provider
    if exporter is not None:
        _installed.add_span_processor(SimpleSpanProcessor(exporter))
        _sampler.exporting = True
    return _installed


def shutdown_tracing() -> None:
    if _installed is not None:
        _installed.shutdown()


_tracer = trace.get_tracer(TRACER_NAME)
"""A proxy until a provider is installed, then forwards to it; cached because get_tracer
costs more than starting a span."""


def tracer() -> trace.Tracer:
    return _tracer


def recording() -> bool:
    """Whether spans are recorded (something exports them). When not, a caller may skip its
    span and only carry the trace context on (`continued`): a span that is not recorded
    costs as much as the work it would wrap on the bus's hot paths."""
    return _sampler.exporting


@contextmanager
def continued(headers: Mapping[str, str] | None) -> Iterator[None]:
    """Make the trace context `headers` carry the current one, without a span of our own:
    what is published meanwhile joins the sender's trace, and logs carry its trace id."""
    token = context.attach(extract(headers))
    try:
        yield
    finally:
        context.detach(token)


def carry(headers: dict[str, str]) -> dict[str, str]:
    """`inject` without a span of the caller's (tracing off): the current trace context, or a
    new trace's when there is none (a span nobody records, never made current)."""
    if trace.get_current_span().get_span_context().is_valid:
        return inject(headers)
    ids = _installed.id_generator if _installed is not None else _ids
    root = trace.SpanContext(ids.generate_trace_id(), ids.generate_span_id(), is_remote=False)
    propagate.inject(headers, context=trace.set_span_in_context(trace.NonRecordingSpan(root)))
    return headers


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Write the current trace context (`traceparent`, `tracestate`) into `headers`."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    """The trace context a message's headers carry (empty context when none).

    Read once per distinct value of the propagator's headers (a batch of events shares one
    `traceparent`): parsing it costs more than decoding the event."""
    textmap = propagate.get_global_textmap()
    carrier = headers or {}
    carried = tuple((name, carrier[name]) for name in _fields(textmap) if name in carrier)
    return _extract(textmap, carried)


@lru_cache(maxsize=8)
def _fields(textmap: TextMapPropagator) -> tuple[str, ...]:
    return tuple(sorted(textmap.fields))


@lru_cache(maxsize=1024)
def _extract(textmap: TextMapPropagator, carried: tuple[tuple[str, str], ...]) -> Context:
    return textmap.extract(dict(carried))  # a Context is immutable: one may serve many
