"""The reporter's Prometheus metrics (served on /metrics with the shared ones)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

STATUSES = Counter(
    "niphas_reporter_statuses_total",
    "Commit statuses, by forge and outcome (posted; refused: the forge answered 4xx; "
    "dropped: retries exhausted or the queue full; skipped: no credentials or forge)",
    ["forge", "outcome"],
)
RETRIES = Counter(
    "niphas_reporter_retries_total", "Status requests retried (forge down, 5xx, 429)", ["forge"]
)
POST_SECONDS = Histogram(
    "niphas_reporter_post_seconds",
    "Time of one status request to a forge",
    ["forge"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LOG_REQUESTS = Counter(
    "niphas_reporter_log_requests_total",
    "Build log requests over HTTP, by answer (200, 404, 400)",
    ["code"],
)
