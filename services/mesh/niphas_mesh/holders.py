"""Which holder to download one store path from next: the mesh's load balancer.

Holders come from the index: peers first (the least loaded first, see `peer_load`: free before
busy, the fewest of this node's downloads, shuffled among equals), the
announced caches, then the want's own binary cache (a workload's, already allowed by the node),
then the configured fallback caches; never this node itself (at its URL or at an
earlier run's). A large NAR that several peers hold is fetched from all of them at once in
byte ranges. When no peer has the path yet, the node announces `fetching`; if other nodes
announced their fetch earlier, it streams from one of them while that node is still receiving
it (never from a later one: no cycles; first from its parent in a tree of the fetchers in
announcement order, `tree_parent`), otherwise it goes to the cache. Each holder is tried
once per state (a `fetching` peer may come back as `available`); a peer that answered 503 (busy,
`upload_slots`) is asked again once free, and while every peer that could serve is busy the
choice waits for one, up to `peer_wait_s` from the start, before it turns to the caches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

from .index import HolderIndex, Holding
from .peer_load import PeerLoad

RETRY_S = 2.0
"""Seconds between looks at the index while waiting for an earlier fetcher to have the path."""
MAX_RANGE_PEERS = 8
"""Peers one NAR is fetched from at once in ranges."""
TREE_FANOUT = 2
"""Followers each node streams one path to first, in a fan-out where nodes fetch it at once
(`tree_parent`)."""


class HolderChoice:
    """The holders of one path, handed out one pick at a time for one download."""

    def __init__(
        self,
        index: HolderIndex,
        path: str,
        *,
        node: str,
        url: str,
        announce_fetching: Callable[[], Awaitable[int]],
        workload_caches: Sequence[str] = (),
        fallback_caches: Sequence[str] = (),
        peer_wait_s: float = 30.0,
        range_min_bytes: int = 64 << 20,
        load: PeerLoad | None = None,
    ) -> None:
        self.index = index
        self.load = load or PeerLoad()
        self.path = path
        self.node = node
        self.url = url
        self._announce_fetching = announce_fetching
        self.workload_caches = workload_caches
        """Read at each look: wants joining the flight may add theirs."""
        self.fallback_caches = tuple(fallback_caches)
        self.peer_wait_s = peer_wait_s
        self.range_min_bytes = range_min_bytes
        self._tried: set[tuple[str, str]] = set()  # (url, state)
        self._mine: int | None = None
        """The stream sequence of this node's `fetching` announcement, once made."""
        self._since = datetime.now(UTC) - timedelta(seconds=peer_wait_s)
        self._started = asyncio.get_running_loop().time()

    async def next(self) -> list[Holding]:
        """The next pick: one holder, or several peers to fetch byte ranges from; empty when
        every holder has been tried. While every peer that could serve is busy (it answered
        503) and the peer deadline has not passed, it waits for one rather than pick a cache."""
        while True:
            holders = [h for h in self.candidates() if (h.url, h.state) not in self._tried]
            if any(h.kind == "node" for h in holders):
                holders = self.load.order(holders)
            else:
                ahead = await self._ahead()
                if ahead is None:
                    continue  # waited for an earlier fetcher to have something: look again
                holders = ahead or self.load.order(holders)  # (ahead: ordered already)
            if not holders:
                return []
            peers = [h for h in holders if h.kind == "node"]
            if peers and all(self.load.is_busy(h.url) for h in peers):
                caches = [h for h in holders if h.kind != "node"]
                left = self._peer_wait_left()
                if left > 0 or not caches:  # (no cache to turn to: wait for a peer anyway)
                    wait = self.load.free_in(peers)
                    await self.index.changed(min(wait, left) if left > 0 else wait)
                    continue
                holders = caches
            free = not_busy(peers, self.load)
            available = [h for h in free if h.state == "available"]
            if len(available) >= 2 and (available[0].nar_size or 0) >= self.range_min_bytes:
                available = available[:MAX_RANGE_PEERS]
                self._tried.update((h.url, h.state) for h in available)
                return available
            self._tried.add((holders[0].url, holders[0].state))
            return [holders[0]]

    def _peer_wait_left(self) -> float:
        """Seconds left of waiting for peers before the caches are asked."""
        return self.peer_wait_s - (asyncio.get_running_loop().time() - self._started)

    def again(self, holder: Holding) -> None:
        """Let `holder` be picked again (a fetching peer that had nothing to serve yet)."""
        self._tried.discard((holder.url, holder.state))

    async def _ahead(self) -> list[Holding] | None:
        """No peer has the path: announce this node's fetch (once), then the nodes that
        announced their fetch earlier and are untried (least loaded first); [] to go to the
        caches; None after waiting for news of an earlier fetcher already tried."""
        if self._mine is None:
            self._mine = await self._announce_fetching()
            await self.index.reached(self._mine, 5.0)
        ahead = [
            h
            for h in self.index.fetchers(self.path, self._since, before=self._mine)
            if not self._me(h)
        ]
        fresh = [h for h in ahead if (h.url, h.state) not in self._tried]
        left = self._peer_wait_left()
        if not ahead or left <= 0:
            return []
        if not fresh:
            await self.index.changed(min(RETRY_S, left))
            return None
        ordered = self.load.order(fresh)
        parent = tree_parent(ahead)
        if parent in fresh and not self.load.is_busy(parent.url):
            ordered.remove(parent)
            ordered.insert(0, parent)
        return ordered

    def candidates(self) -> list[Holding]:
        """Every holder worth asking, best first."""
        found = [h for h in self.index.available(self.path) if not self._me(h)]
        known = {h.url for h in found}
        epoch = datetime.fromtimestamp(0, UTC)
        extra = dict.fromkeys([*self.workload_caches, *self.fallback_caches])
        found += [
            Holding("cache", url, url, "available", 0, epoch) for url in extra if url not in known
        ]
        return found

    def _me(self, holder: Holding) -> bool:
        """This node, at its URL or at an earlier run's (a restarted agent may listen on
        another port or pod IP; what that run announced is stale, never worth waiting for)."""
        return holder.url == self.url or (holder.kind == "node" and holder.holder == self.node)


def tree_parent(ahead: Sequence[Holding]) -> Holding | None:
    """Which of the nodes that announced their fetch of a path before this one to stream it
    from first: in announcement order, node k (node 0 goes to the caches) asks node
    (k - 1) // TREE_FANOUT. The nodes fetching a path at once form a tree of TREE_FANOUT
    followers per node and depth log(N), instead of all streaming from the first few
    announcers (a random pick among the earlier ones gives node 0 ~ln N followers), and as
    every path's order differs, each node passes on about its share of the closure."""
    if not ahead:
        return None
    ordered = sorted(ahead, key=lambda h: h.seq)
    return ordered[(len(ordered) - 1) // TREE_FANOUT]


def not_busy(holders: list[Holding], load: PeerLoad) -> list[Holding]:
    return [h for h in holders if not load.is_busy(h.url)]
