"""One publish -> consume hop is one trace: the consumer's span is a child of the publish span,
carried by the `traceparent` header; log lines written in a handler carry the event id."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from niphas_common.bus.bus import Bus
from niphas_common.bus.consumer import Delivery, Subscription
from niphas_common.bus.topology import ConsumerSpec
from niphas_common.tracing import setup_tracing, tracer
from niphas_schemas import PushReceived
from tests.helpers import eventually, serving


@pytest.fixture
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    setup_tracing("niphas-tests", exporter)
    return exporter


async def test_publish_and_consume_spans_share_one_trace(
    bus: Bus, push_event: Callable[..., PushReceived], spans: InMemorySpanExporter
) -> None:
    handler_trace: list[int] = []

    async def handle(ev: PushReceived, delivery: Delivery) -> None:
        assert "traceparent" in delivery.headers
        with tracer().start_as_current_span("evaluate"):
            handler_trace.append(trace.get_current_span().get_span_context().trace_id)

    event = push_event("delivery-traced")
    with tracer().start_as_current_span("webhook") as root:
        await bus.publish(event)
    spec = ConsumerSpec(durable="trace-test", subject="push.received")
    async with serving(bus, [Subscription(PushReceived, spec, handle)]):
        await eventually(lambda: bool(handler_trace))

    by_name = {s.name: s for s in spans.get_finished_spans()}
    publish = by_name["publish push.received"]
    process = by_name["process push.received"]
    evaluate = by_name["evaluate"]
    trace_id = root.get_span_context().trace_id
    assert publish.context is not None and process.context is not None
    assert {publish.context.trace_id, process.context.trace_id, handler_trace[0]} == {trace_id}
    assert publish.kind is SpanKind.PRODUCER
    assert process.kind is SpanKind.CONSUMER
    assert publish.parent is not None and publish.parent.span_id == root.get_span_context().span_id
    assert process.parent is not None and process.parent.span_id == publish.context.span_id
    assert evaluate.parent is not None and evaluate.parent.span_id == process.context.span_id
    assert publish.attributes is not None
    assert publish.attributes["messaging.message.id"] == event.msg_id


async def test_handler_logs_carry_the_event_id(
    bus: Bus, push_event: Callable[..., PushReceived], caplog: pytest.LogCaptureFixture
) -> None:
    from niphas_common.logs import JsonFormatter, _ContextFilter

    lines: list[str] = []

    async def handle(ev: PushReceived, delivery: Delivery) -> None:
        logging.getLogger("niphas.test").info("evaluating %s", ev.repository)

    handler = logging.Handler()
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter())
    handler.emit = lambda record: lines.append(handler.format(record))  # type: ignore[method-assign]
    logging.getLogger("niphas.test").addHandler(handler)
    logging.getLogger("niphas.test").setLevel(logging.INFO)
    try:
        event = push_event("delivery-logged")
        await bus.publish(event)
        spec = ConsumerSpec(durable="log-test", subject="push.received")
        async with serving(bus, [Subscription(PushReceived, spec, handle)]):
            await eventually(lambda: bool(lines))
    finally:
        logging.getLogger("niphas.test").removeHandler(handler)
    import json

    entry = json.loads(lines[0])
    assert entry["event_id"] == event.event_id
    assert entry["message"] == f"evaluating {event.repository}"
    assert entry["trace_id"] and len(entry["trace_id"]) == 32


async def test_with_tracing_off_the_consumer_continues_the_senders_trace_without_a_span(
    bus: Bus, push_event: Callable[..., PushReceived], monkeypatch: pytest.MonkeyPatch
) -> None:
    from niphas_common import tracing

    monkeypatch.setattr(tracing._sampler, "exporting", False)
    seen: list[tuple[str, int, int]] = []

    async def handle(ev: PushReceived, delivery: Delivery) -> None:
        current = trace.get_current_span().get_span_context()
        seen.append((delivery.headers["traceparent"], current.trace_id, current.span_id))

    await bus.publish(push_event("delivery-untraced"))
    spec = ConsumerSpec(durable="untraced-test", subject="push.received")
    async with serving(bus, [Subscription(PushReceived, spec, handle)]):
        await eventually(lambda: bool(seen))

    traceparent, trace_id, span_id = seen[0]
    _, sent_trace, sent_span, _ = traceparent.split("-")
    # The handler runs in the sender's context itself: same trace, and no consumer span between.
    assert (format(trace_id, "032x"), format(span_id, "016x")) == (sent_trace, sent_span)


async def test_with_tracing_off_a_publish_carries_the_current_trace_or_starts_one(
    bus: Bus, push_event: Callable[..., PushReceived], monkeypatch: pytest.MonkeyPatch
) -> None:
    from niphas_common import tracing

    monkeypatch.setattr(tracing._sampler, "exporting", False)
    sent: dict[str, str] = {}

    async def handle(ev: PushReceived, delivery: Delivery) -> None:
        sent[ev.delivery_id] = delivery.headers["traceparent"]

    current = trace.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=trace.TraceFlags(1),
    )
    with trace.use_span(trace.NonRecordingSpan(current)):
        await bus.publish(push_event("in-a-trace"))
    await bus.publish(push_event("first-root"))
    await bus.publish(push_event("second-root"))
    spec = ConsumerSpec(durable="carry-test", subject="push.received")
    async with serving(bus, [Subscription(PushReceived, spec, handle)]):
        await eventually(lambda: len(sent) == 3)

    # Inside a trace: its context itself, no producer span of ours in between.
    assert sent["in-a-trace"].split("-")[1:3] == [
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
    ]
    # Outside any: each publish starts its own trace, still carried.
    roots = [sent["first-root"].split("-")[1], sent["second-root"].split("-")[1]]
    assert roots[0] != roots[1] and all(int(r, 16) for r in roots)


def test_extract_reads_each_distinct_trace_context_once() -> None:
    from niphas_common.tracing import extract

    first = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    second = "00-1bf7651916cd43dd8448eb211c80319d-c7ad6b7169203332-01"
    a = extract({"traceparent": first, "Nats-Msg-Id": "push.received:a"})
    b = extract({"traceparent": second, "Nats-Msg-Id": "push.received:b"})
    again = extract({"traceparent": first, "Nats-Msg-Id": "push.received:c"})

    def ids(ctx: object) -> tuple[str, str]:
        span = trace.get_current_span(ctx).get_span_context()  # type: ignore[arg-type]
        return format(span.trace_id, "032x"), format(span.span_id, "016x")

    assert ids(a) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    assert ids(b) == ("1bf7651916cd43dd8448eb211c80319d", "c7ad6b7169203332")
    assert again is a  # read once: other headers (Msg-Id) do not matter
    assert not trace.get_current_span(extract({})).get_span_context().is_valid
