"""Who holds what: every holder's latest state for every store path, from `path.available`.

The index is rebuilt on start from the whole PATH_AVAILABLE stream, in order, then kept current
(by a `router.Router`: the bus's, or an in-memory twin in tests). It is
advice for choosing where to download from, never trusted: every narinfo and NAR is verified.
Each entry remembers the stream sequence of its announcement, which orders concurrent
`fetching` announcements: the first node to announce a fetch goes to the cache, the others
stream from nodes that announced before them (see `Fetcher._download`).

A node is one holder whatever its URL: its newest announcement about a path replaces what it
said earlier, also from another URL (a restarted agent, a new pod IP), so peers never keep
trying an address the node left and the index does not grow with every restart. A cache is
one holder per URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass
from datetime import datetime

from niphas_schemas import PathAvailable


@dataclass(frozen=True)
class Holding:
    """One holder's latest word about one path."""

    kind: str
    holder: str
    url: str
    state: str
    seq: int
    at: datetime
    nar_size: int | None = None


class HolderIndex:
    def __init__(self) -> None:
        self._paths: dict[str, dict[str, Holding]] = {}
        self.last_seq = 0
        self._changed = asyncio.Event()

    def apply(self, event: PathAvailable, seq: int) -> None:
        holders = self._paths.setdefault(event.store_path, {})
        key = _key(event.holder_kind, event.holder, event.holder_url)
        if event.state == "withdrawn":
            holders.pop(key, None)
            if not holders:
                del self._paths[event.store_path]
        else:
            holders[key] = Holding(
                event.holder_kind,
                event.holder,
                event.holder_url,
                event.state,
                seq,
                event.occurred_at,
                event.nar_size,
            )
        self.last_seq = max(self.last_seq, seq)
        # Wake every waiter; each re-checks what it waits for.
        self._changed.set()
        self._changed = asyncio.Event()

    def holdings(self, store_path: str) -> list[Holding]:
        return list(self._paths.get(store_path, {}).values())

    def available(self, store_path: str, exclude: str = "") -> list[Holding]:
        """Holders to try, best first: peers (shuffled, to spread the load), then caches."""
        found = [
            h for h in self.holdings(store_path) if h.state == "available" and h.url != exclude
        ]
        peers = [h for h in found if h.kind == "node"]
        random.shuffle(peers)
        return peers + [h for h in found if h.kind == "cache"]

    def fetchers(self, store_path: str, newer_than: datetime, before: int) -> list[Holding]:
        """Nodes whose still-current `fetching` announcement (since a time) came before
        stream sequence `before`."""
        return [
            h
            for h in self.holdings(store_path)
            if h.state == "fetching" and h.kind == "node" and h.at >= newer_than and h.seq < before
        ]

    def held_by(self, url: str) -> set[str]:
        """Paths the holder at `url` announced as available and has not withdrawn."""
        return {
            path
            for path, holders in self._paths.items()
            if any(h.url == url and h.state == "available" for h in holders.values())
        }

    def announced_by(self, node: str) -> set[str]:
        """Paths node `node` announced (at any URL, in any state) and has not withdrawn."""
        key = _key("node", node, "")
        return {path for path, holders in self._paths.items() if key in holders}

    def __len__(self) -> int:
        return len(self._paths)

    async def changed(self, timeout: float) -> None:  # noqa: ASYNC109 (a bounded wait)
        """Return at the next update, or after `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(timeout, 0.0))

    async def reached(self, seq: int, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until the index has applied stream sequence `seq`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.last_seq < seq:
            left = end - loop.time()
            if left <= 0:
                return False
            await self.changed(left)
        return True


def _key(kind: str, holder: str, url: str) -> str:
    return f"node {holder}" if kind == "node" else f"cache {url}"
