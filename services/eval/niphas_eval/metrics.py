"""The eval service's own Prometheus metrics (beside niphas_common's event counters)."""

from __future__ import annotations

from functools import cache

from prometheus_client import Counter, Histogram

WEBHOOKS = Counter(
    "niphas_eval_webhooks_total",
    "Webhook deliveries answered, by forge and outcome (accepted, duplicate, ignored, ping, "
    "rejected, unavailable)",
    ["forge", "outcome"],
)


@cache
def webhook_outcome(forge: str, outcome: str) -> Counter:
    """WEBHOOKS' child of one forge and outcome (both from fixed sets), looked up once."""
    return WEBHOOKS.labels(forge, outcome)


EVALUATIONS = Counter(
    "niphas_eval_evaluations_total",
    "Evaluations finished, by status (succeeded, failed) and reason class",
    ["status", "reason"],
)
EVALUATIONS_SKIPPED = Counter(
    "niphas_eval_skipped_total",
    "push.received events not evaluated because the commit was already evaluated or is "
    "being evaluated by another worker",
    ["why"],
)
EVAL_SECONDS = Histogram(
    "niphas_eval_seconds",
    "Wall time of one flake evaluation (the nix process)",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
)
DRV_UPLOADS = Counter(
    "niphas_eval_drv_uploads_total",
    "Derivation closures of successful evaluations copied to the cluster cache, by outcome "
    "(uploaded, failed: eval.done published without them)",
    ["outcome"],
)
