"""Prometheus metrics every service shares; each service's /metrics serves the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_HANDLED = Counter(
    "niphas_events_handled_total",
    "Events a consumer finished with, by outcome (acked, retried, dead)",
    ["subject", "consumer", "outcome"],
)
EVENTS_PUBLISHED = Counter(
    "niphas_events_published_total",
    "Events stored by JetStream, by whether the Msg-Id was a duplicate",
    ["subject", "duplicate"],
)
HANDLER_SECONDS = Histogram(
    "niphas_handler_seconds",
    "Time spent in an event handler",
    ["subject", "consumer"],
    buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 60, 300, 1800),
)
CONSUMER_PENDING = Gauge(
    "niphas_consumer_pending",
    "Messages of the stream not yet delivered to this durable consumer (queue depth), as last "
    "read from JetStream",
    ["stream", "consumer"],
)
CONSUMER_ACK_PENDING = Gauge(
    "niphas_consumer_ack_pending",
    "Messages delivered to this durable consumer and not yet acknowledged (being handled)",
    ["stream", "consumer"],
)
