"""The mesh agent's Prometheus metrics (served on its own /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SERVED_BYTES = Counter(
    "niphas_mesh_served_bytes_total",
    "Bytes of NARs served over HTTP, by source (the node's store, the cache directory, or a "
    "download in progress: fetching)",
    ["node", "source"],
)
FETCHED_BYTES = Counter(
    "niphas_mesh_fetched_bytes_total",
    "Verified NAR bytes this node fetched, by holder kind (node or cache)",
    ["node", "holder_kind"],
)
FETCHES = Counter(
    "niphas_mesh_fetches_total",
    "Paths fetched and imported, by outcome (imported, failed)",
    ["node", "outcome"],
)
REJECTED = Counter(
    "niphas_mesh_rejected_total",
    "Downloads rejected or abandoned, by holder and reason (signature, hash, nar, stall, error)",
    ["node", "holder", "reason"],
)
SINGLE_FLIGHT_JOINS = Counter(
    "niphas_mesh_single_flight_joins_total",
    "Wants that joined a fetch already in progress instead of starting one",
    ["node"],
)
GC_DELETED = Counter(
    "niphas_mesh_gc_deleted_paths_total", "Store paths garbage-collected", ["node"]
)
DISK_USED = Gauge(
    "niphas_mesh_disk_used_percent", "Percent of the store's file system in use", ["node"]
)
INDEX_PATHS = Gauge(
    "niphas_mesh_index_paths", "Store paths with at least one known holder", ["node"]
)
CACHE_UPLOADS = Counter(
    "niphas_mesh_cache_uploads_total",
    "Uploads to the cluster cache (role cache), by outcome (stored, refused, unauthorized, "
    "bad_name)",
    ["node", "outcome"],
)
IGNORED_RECORDS = Counter(
    "niphas_mesh_ignored_records_total",
    "Holder records skipped as forged or malformed, by reason (garbage: not decodable; "
    "mismatch: the body is not what its key names; key: not a holder key)",
    ["reason"],
)
DOWNLOAD_RETRIES = Counter(
    "niphas_mesh_download_retries_total",
    "NAR requests a holder turned away for now and asked again later, by reason (busy: its "
    "upload slots were full; missing: a fetching peer had nothing to serve yet)",
    ["node", "reason"],
)
IMPORT_BATCHES = Counter(
    "niphas_mesh_import_batches_total",
    "`nix copy` runs importing verified downloads (several paths each when they land together)",
    ["node"],
)
