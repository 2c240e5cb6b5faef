"""The builder's Prometheus metrics (served on /metrics with the shared ones)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

BUILDS = Counter(
    "niphas_builder_builds_total",
    "Builds this process ran through its executor, by outcome (built, failed, error)",
    ["outcome"],
)
PUSHES = Counter("niphas_builder_pushes_total", "Closures this process pushed to the cache")
PATHS_PUSHED = Counter("niphas_builder_paths_pushed_total", "Store paths in pushed closures")
RESULTS = Counter(
    "niphas_builder_results_total",
    "build.done events published, by status (built, cached, failed) and how they came about "
    "(executor, cache, shared: another builder's result, superseded, cancelled)",
    ["status", "source"],
)
CANCELLED = Counter(
    "niphas_builder_cancelled_total",
    "Running builds cancelled because a newer push of their ref made them pointless",
)
LEASE_WAITS = Counter(
    "niphas_builder_lease_waits_total", "Times a builder waited for another's build"
)
BUILD_SECONDS = Histogram(
    "niphas_builder_build_seconds",
    "Wall time of one build through the executor",
    buckets=(1, 5, 15, 60, 300, 900, 3600, 14400),
)
