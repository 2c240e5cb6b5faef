"""What the binary cache endpoints serve from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .inflight import Inflight
from .last_use import LastUse
from .store import NodeStore


@dataclass(frozen=True)
class CacheView:
    """What the endpoints serve from."""

    node: str
    store: NodeStore
    last_use: LastUse
    compression: str = "none"
    priority: int = 30
    cache_dir: Path | None = None
    inflight: Inflight = field(default_factory=Inflight)
    """Downloads in progress, served to peers while they arrive."""
    partial_wait_s: float = 2.0
    """Seconds a narinfo request for a path being fetched waits for its verified narinfo."""


HASH_RE = "[0123456789abcdfghijklmnpqrsvwxyz]{32}"
