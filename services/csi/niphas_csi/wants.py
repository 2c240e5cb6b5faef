"""Asking the node's mesh agent for missing paths: publish `path.wanted.<node>`, wait for its
answers (this node's holder record of each path becoming `available`, or `failed` with a
reason).

Each waiting publish listens to exactly the holder records it waits for, this node's word
about each asked path (`<hash>.node.<node>` in the `niphas-holders` state), from before the
want is published until it is answered: the driver never receives the rest of the cluster's
announcements, nor this node's about other paths. A `failed` record counts only when it names
this want's requester (the mesh answers each want on its own): another volume's want failing,
say for naming a binary cache the node does not allow, never fails this one. The store is also
re-checked now and then, in case an answer was missed (a reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

from niphas_common.bus.bus import Bus
from niphas_common.bus.codec import decode
from niphas_common.bus.state import Entry
from niphas_common.errors import PoisonMessage
from niphas_schemas import HOLDERS_BUCKET, PathAvailable, PathWanted
from niphas_schemas.holders import path_key

from .errors import FetchDeadline, PathsUnavailable

log = logging.getLogger(__name__)

StillMissing = Callable[[Sequence[str]], Awaitable[Sequence[str]]]
"""Given paths, return those the store still lacks."""


class _Wait:
    def __init__(self, paths: Sequence[str], requester: str) -> None:
        self.pending = set(paths)
        self.requester = requester
        self.failure: str | None = None
        self.changed = asyncio.Event()


class PathWants:
    def __init__(self, bus: Bus, node_id: str) -> None:
        self.bus = bus
        self.node_id = node_id
        self.heard = 0
        """Holder records received so far (only ever those of asked paths on this node)."""

    async def start(self) -> None:
        await self.bus.state(HOLDERS_BUCKET)  # opened (or created) before the first mount

    async def stop(self) -> None:
        pass

    def _on_record(self, wait: _Wait) -> Callable[[Entry], Awaitable[None]]:
        async def on_record(entry: Entry) -> None:
            self.heard += 1
            if entry.value is None:
                return  # withdrawn: not an answer
            try:
                event = decode(PathAvailable, entry.value)
            except PoisonMessage as exc:
                log.warning("ignoring holder record %s: %s", entry.key, exc)
                return
            if event.state_key != entry.key or event.store_path not in wait.pending:
                log.warning("ignoring holder record %s: not the one asked for", entry.key)
                return
            if event.state == "available":
                wait.pending.discard(event.store_path)
            elif event.state == "failed":
                if not (event.error or "").startswith(f"{wait.requester}: "):
                    # Another want's failure (the mesh names the requester in each): this
                    # want gets its own answer, so one volume's refusal never fails another's.
                    return
                wait.failure = f"{event.store_path}: {event.error}"
            wait.changed.set()

        return on_record

    async def fetch(
        self,
        paths: Sequence[str],
        requester: str,
        timeout_s: float,
        still_missing: StillMissing,
        recheck_s: float,
        binary_cache: str | None = None,
        binary_cache_public_key: str | None = None,
    ) -> None:
        """Return once every path is in the node's store; raise PathsUnavailable when the
        mesh reports a failure, FetchDeadline when `timeout_s` passes first.

        `binary_cache` (with its `binary_cache_public_key`): the workload's own cache, passed
        in the want; the mesh decides whether its node allows it (a refusal is a failure)."""
        wait = _Wait(paths, requester)
        state = await self.bus.state(HOLDERS_BUCKET)
        keys = {path_key(p, "node", self.node_id, "") for p in paths}
        listener = await state.listen(sorted(keys), self._on_record(wait))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            await self.bus.publish(
                PathWanted(
                    node=self.node_id,
                    store_paths=tuple(paths),
                    deadline=datetime.now(UTC) + timedelta(seconds=timeout_s),
                    requester=requester,
                    binary_cache=binary_cache,
                    binary_cache_public_key=binary_cache_public_key,
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
            await listener.stop()
