"""Who holds what: every holder's latest state for every store path.

The index is built on start from the holder state (the `niphas-holders` bucket, see
`niphas_schemas.holders`), then kept current (by a `router.Router`: the bus's, or an in-memory
twin in tests). It is advice for choosing where to download from, never trusted: every narinfo
and NAR is verified. Each entry remembers the revision of its record, which orders concurrent
`fetching` announcements: the first node to announce a fetch goes to the cache, the others
stream from nodes that announced before them (see `Fetcher._download`).

A node is one holder whatever its URL: its newest word about a path replaces what it said
earlier, also from another URL (a restarted agent, a new pod IP). Its holdings are offered only
at the URL it registered for itself (`set_node`), and only while that registration says it
serves and is younger than `node_ttl_s` (its agent rewrites it meanwhile): a record naming
another address for it (forged, or an earlier run's) is never fetched from, nor a node that
stopped or vanished. `departed` names the records of nodes gone for long enough to delete.
A cache is one holder per URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from dataclasses import dataclass
from datetime import UTC, datetime

from niphas_schemas import PathAvailable
from niphas_schemas.holders import NodeRecord, hash_part, holder_id


@dataclass(frozen=True, slots=True)
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
    def __init__(self, node_ttl_s: float | None = None) -> None:
        self.node_ttl_s = node_ttl_s
        """A node registration older than this is not trusted to serve (None: any age)."""
        self._paths: dict[str, dict[str, Holding]] = {}
        """Hash part -> holder id -> holding."""
        self._full: dict[str, str] = {}
        """Hash part -> the full store path (names the paths `held_by` returns)."""
        self._nodes: dict[str, NodeRecord] = {}
        """Node -> what it last said about itself."""
        self.last_seq = 0
        self._changed = asyncio.Event()
        self._waiting = 0
        """Tasks in `changed` right now (nobody waiting: nothing to wake)."""

    def set_node(self, node: str, record: NodeRecord | None, seq: int = 0) -> None:
        """What node `node` said about itself (None: its record was deleted)."""
        if record is None:
            self._nodes.pop(node, None)
        else:
            self._nodes[node] = record
        self._moved(seq)

    def node_url(self, node: str, now: datetime | None = None) -> str | None:
        """Where node `node` serves now; None if it never said, stopped or went quiet."""
        record = self._nodes.get(node)
        if record is None or not record.serving:
            return None
        if self.node_ttl_s is not None:
            age = ((now or datetime.now(UTC)) - record.at).total_seconds()
            if age > self.node_ttl_s:
                return None
        return record.url

    def remove(self, hash_part_: str, holder: str, seq: int) -> None:
        """Forget holder id `holder`'s word about the path with hash part `hash_part_`."""
        holders = self._paths.get(hash_part_)
        if holders is not None:
            holders.pop(holder, None)
            if not holders:
                del self._paths[hash_part_]
                self._full.pop(hash_part_, None)
        self._moved(seq)

    def apply(self, event: PathAvailable, seq: int) -> None:
        h = hash_part(event.store_path)
        key = holder_id(event.holder_kind, event.holder, event.holder_url)
        if event.state == "withdrawn":
            self.remove(h, key, seq)
            return
        self._full[h] = event.store_path
        # Holders, URLs and states repeat across paths: one string object each (a view of a
        # million holdings is mostly these).
        self._paths.setdefault(h, {})[sys.intern(key)] = Holding(
            sys.intern(event.holder_kind),
            sys.intern(event.holder),
            sys.intern(event.holder_url),
            sys.intern(event.state),
            seq,
            event.occurred_at,
            event.nar_size,
        )
        self._moved(seq)

    def _moved(self, seq: int) -> None:
        if seq > self.last_seq:
            self.last_seq = seq
        if self._waiting:  # wake every waiter; each re-checks what it waits for
            self._changed.set()
            self._changed = asyncio.Event()

    def holdings(self, store_path: str) -> list[Holding]:
        """Every holder's word about `store_path`, as recorded (whether offered or not)."""
        return list(self._paths.get(hash_part(store_path), {}).values())

    def offered(self, holding: Holding, now: datetime | None = None) -> bool:
        """Whether `holding` may be fetched from: a cache's, or a node's at the URL the node
        registered for itself, while it serves."""
        return holding.kind == "cache" or self.node_url(holding.holder, now) == holding.url

    def live_nodes(self, now: datetime) -> list[str]:
        """Nodes serving now, by name."""
        return sorted(n for n in self._nodes if self.node_url(n, now) is not None)

    def departed(self, now: datetime, after_s: float) -> dict[str, list[str]]:
        """Nodes gone for more than `after_s` seconds (their record says they stopped, or it
        went quiet, that long ago; or they never registered and said nothing about any path
        for that long), with the keys of their path records."""
        keys: dict[str, list[str]] = {}
        newest: dict[str, datetime] = {}
        for h, holders in self._paths.items():
            for key, holding in holders.items():
                if holding.kind == "node" and self.node_url(holding.holder, now) is None:
                    keys.setdefault(holding.holder, []).append(f"{h}.{key}")
                    last = newest.get(holding.holder)
                    newest[holding.holder] = holding.at if last is None else max(last, holding.at)
        gone = {}
        for node, node_keys in keys.items():
            record = self._nodes.get(node)
            since = newest[node] if record is None else record.at
            if (now - since).total_seconds() > after_s:
                gone[node] = node_keys
        return gone

    def available(self, store_path: str, exclude: str = "") -> list[Holding]:
        """Holders to try, best first: peers (shuffled, to spread the load), then caches."""
        now = datetime.now(UTC)
        found = [
            h
            for h in self.holdings(store_path)
            if h.state == "available" and h.url != exclude and self.offered(h, now)
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
            if h.state == "fetching"
            and h.kind == "node"
            and h.at >= newer_than
            and h.seq < before
            and self.offered(h)
        ]

    def held_by(self, url: str) -> set[str]:
        """Paths the holder at `url` announced as available and has not withdrawn."""
        return {
            self._full[h]
            for h, holders in self._paths.items()
            if any(x.url == url and x.state == "available" for x in holders.values())
        }

    def announced_by(self, node: str) -> set[str]:
        """Paths node `node` announced (at any URL, in any state) and has not withdrawn."""
        key = holder_id("node", node, "")
        return {self._full[h] for h, holders in self._paths.items() if key in holders}

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def holding_count(self) -> int:
        """(path, holder) pairs recorded."""
        return sum(len(holders) for holders in self._paths.values())

    async def changed(self, timeout: float) -> None:  # noqa: ASYNC109 (a bounded wait)
        """Return at the next update, or after `timeout` seconds."""
        self._waiting += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(timeout, 0.0))
        finally:
            self._waiting -= 1

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
