"""What the binary cache endpoints serve from, shared through the aiohttp application."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

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


VIEW = web.AppKey("view", CacheView)
HASH_RE = "[0123456789abcdfghijklmnpqrsvwxyz]{32}"
