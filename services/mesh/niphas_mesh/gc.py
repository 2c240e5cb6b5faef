"""Garbage collection by disk watermarks, least recently used first, never a leased path.

When the store's file system is fuller than `high` percent, the collector deletes store paths
until it is below `low`: oldest last use first, only paths nothing else on the node references
any more (deleting a leaf can make its references leaves in turn), never a path in the closure
of a lease (the CSI driver's GC roots, see `niphas_common.leases`). Deletion goes through
`nix-store --delete`, which refuses anything still alive, so a lease created between the
choice and the deletion is still honoured. Every deleted path is withdrawn from the mesh.

A pass can also be forced (an import just failed on a full disk, see `Fetcher.ensure`): it
frees down to the low watermark whatever the usage, since the failed import's partial tree was
removed again and may have left the disk below the high one. The closures of the wants being
answered are passed in as `keep`, so a pass never deletes what a fetch has just imported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Set

from niphas_common.leases import leased_paths
from niphas_common.nix.runner import PathInfo

from .last_use import LastUse
from .metrics import DISK_USED, GC_DELETED
from .store import NodeStore

log = logging.getLogger(__name__)

Withdraw = Callable[[PathInfo], Awaitable[object]]


class Collector:
    def __init__(
        self,
        store: NodeStore,
        last_use: LastUse,
        withdraw: Withdraw,
        *,
        node: str,
        high_percent: float,
        low_percent: float,
    ) -> None:
        self.store = store
        self.last_use = last_use
        self.withdraw = withdraw
        self.node = node
        self.high = high_percent
        self.low = min(low_percent, high_percent)
        self._pass = asyncio.Lock()  # one pass at a time: periodic and forced ones overlap

    def protected(self) -> set[str]:
        """Hash parts of every leased path and everything it references, transitively."""
        return self.store.closure(p.rsplit("/", 1)[-1][:32] for p in leased_paths(self.store.root))

    async def collect(self, *, force: bool = False, keep: Set[str] = frozenset()) -> list[PathInfo]:
        """One pass: if above the high watermark (or `force`d), delete down to the low one,
        never a path whose hash part is in `keep`."""
        async with self._pass:
            return await self._collect(force, keep)

    async def _collect(self, force: bool, keep: Set[str]) -> list[PathInfo]:
        used = self.store.usage_percent()
        DISK_USED.labels(self.node).set(used)
        if used < self.high and not force:
            return []
        why = "forced" if force else f"high watermark {self.high:.1f}%"
        log.info("store %.1f%% full (%s): collecting", used, why)
        await self.store.scan()
        keep = self.protected() | keep
        refused: set[str] = set()
        deleted: list[PathInfo] = []
        while used >= self.low:
            referrers = self.store.referrers()
            leaves = [
                info
                for info in self.store.paths()
                if not referrers.get(info.path.hash_part)
                and info.path.hash_part not in keep
                and info.path.hash_part not in refused
            ]
            if not leaves:
                log.warning("store %.1f%% full but nothing more is collectable", used)
                break
            victim = min(leaves, key=lambda i: (self.last_use.get(i.path.hash_part), i.path))
            announced = self.store.is_signed(victim)
            if not await self.store.delete(victim.path):
                refused.add(victim.path.hash_part)  # alive: a GC root we did not know about
                continue
            deleted.append(victim)
            self.last_use.forget(victim.path.hash_part)
            GC_DELETED.labels(self.node).inc()
            if announced:
                await self.withdraw(victim)
            used = self.store.usage_percent()
        DISK_USED.labels(self.node).set(used)
        self.last_use.save()
        return deleted
