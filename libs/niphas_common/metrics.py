"""Prometheus metrics every service shares; each service's /metrics serves the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
