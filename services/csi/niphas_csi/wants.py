"""Asking the node's mesh agent for missing paths: publish `path.wanted`, wait for its
`path.available` answers (state `available` from this node, or `failed` with a reason).

One watch of `path.available` (new events only) runs for the life of the driver,
so it is listening before any want is published; each waiting publish registers the paths it
waits for. The store is also re-checked now and then, in case an answer was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

from niphas_common.bus.bus import Bus
from niphas_common.bus.watch import Watch
from niphas_schemas import PathAvailable, PathWanted

from .errors import FetchDeadline, PathsUnavailable

log = logging.getLogger(__name__)

StillMissing = Callable[[Sequence[str]], Awaitable[Sequence[str]]]
"""Given paths, return those the store still lacks."""


class _Wait:
    def __init__(self, paths: Sequence[str]) -> None:
        self.pending = set(paths)
        self.failure: str | None = None
        self.changed = asyncio.Event()


class PathWants:
    def __init__(self, bus: Bus, node_id: str) -> None:
        self.bus = bus
        self.node_id = node_id
        self._waits: set[_Wait] = set()
        self._watch: Watch[PathAvailable] | None = None

    async def start(self) -> None:
        self._watch = await self.bus.watch(PathAvailable, self._on_event, replay=False)

    async def stop(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.stop()

    async def _on_event(self, event: PathAvailable, _seq: int) -> None:
        if event.holder != self.node_id or event.state not in ("available", "failed"):
            return
        for wait in self._waits:
            if event.store_path not in wait.pending:
                continue
            if event.state == "available":
                wait.pending.discard(event.store_path)
            else:
                wait.failure = f"{event.store_path}: {event.error}"
            wait.changed.set()

    async def fetch(
        self,
        paths: Sequence[str],
        requester: str,
        timeout_s: float,
        still_missing: StillMissing,
        recheck_s: float,
    ) -> None:
        """Return once every path is in the node's store; raise PathsUnavailable when the
        mesh reports a failure, FetchDeadline when `timeout_s` passes first."""
        wait = _Wait(paths)
        self._waits.add(wait)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            await self.bus.publish(
                PathWanted(
                    node=self.node_id,
                    store_paths=tuple(paths),
                    deadline=datetime.now(UTC) + timedelta(seconds=timeout_s),
                    requester=requester,
                )
            )
            while True:
                if wait.failure is not None:
                    raise PathsUnavailable(
                        f"the mesh on node {self.node_id} could not fetch {wait.failure}"
                    )
                if not wait.pending:
                    return
                left = deadline - loop.time()
                if left <= 0:
                    raise FetchDeadline(
                        f"{len(wait.pending)} store path(s) did not arrive on node "
                        f"{self.node_id} within {timeout_s:g} s: {', '.join(sorted(wait.pending))}"
                    )
                wait.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wait.changed.wait(), min(left, recheck_s))
                if wait.pending and wait.failure is None and not wait.changed.is_set():
                    wait.pending &= set(await still_missing(sorted(wait.pending)))
        finally:
            self._waits.discard(wait)
