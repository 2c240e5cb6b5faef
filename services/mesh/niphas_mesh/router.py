"""Where holders are learned and holdings told: the `Router` behind the fetcher, the
collector and the agent's announcements.

A router keeps a `HolderIndex` in step with the holder state (`niphas-holders`: each holder's
latest word about each path, and each node's own record of its URL; no age limit, see
`niphas_schemas.holders`): read whole at start, then followed. It registers this node at its
URL (`register`, again and again while it serves: a heartbeat; `leave` says it stopped) and
announces this node's words, returning each one's revision (which orders concurrent `fetching`
announcements, see `HolderIndex.fetchers`). Every record read is checked against its key first
(`holder_state.apply_record`).

`BusRouter` does this over NATS: a state write, then the same event on `path.available` (kept
for people to inspect, and for whoever waits on a subject). `MemoryRouter` is its in-process
twin for tests without a server: routers created from one `MemoryState` see each other's
writes at once, in one order, as agents sharing a NATS server do. Both pass the same
conformance tests (tests/niphas_mesh/test_router.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from niphas_common.bus.bus import Bus
from niphas_common.bus.codec import encode
from niphas_common.bus.state import Entry, State, StateWatch
from niphas_schemas import HOLDERS_BUCKET, NodeRecord, PathAvailable
from niphas_schemas.holders import node_key

from .holder_state import apply_record, upgrade
from .index import HolderIndex

log = logging.getLogger(__name__)


class Router(Protocol):
    index: HolderIndex

    @property
    def caught_up(self) -> bool:
        """Whether every record stored before the start has reached the index."""
        ...

    async def start(self) -> None: ...

    async def register(self, node: str, url: str) -> int:
        """Record that `node` serves at `url` (its holdings count only there)."""
        ...

    async def leave(self, node: str) -> None:
        """Record that `node` stopped: nobody fetches from it until it registers again."""
        ...

    async def remove(self, keys: Iterable[str]) -> None:
        """Delete holder records (those of a node gone for good)."""
        ...

    async def announce(self, event: PathAvailable) -> int:
        """Record and publish `event`; its revision."""
        ...

    async def stop(self) -> None: ...


class BusRouter:
    """The router over the `niphas-holders` bucket (and `path.available` for the record)."""

    def __init__(self, bus: Bus, index: HolderIndex | None = None) -> None:
        self._bus = bus
        self.index = index if index is not None else HolderIndex()
        self._urls: dict[str, str] = {}
        self._state: State | None = None
        self._watch: StateWatch | None = None

    @property
    def caught_up(self) -> bool:
        return self._watch is not None and self._watch.caught_up

    @property
    def records_read(self) -> int:
        return 0 if self._watch is None else self._watch.entries

    async def start(self) -> None:
        self._state = await self._bus.state(HOLDERS_BUCKET, description="latest path.available")
        await upgrade(self._bus, self._state)
        self._watch = await self._state.watch(self._apply)

    async def _apply(self, entry: Entry) -> None:
        apply_record(self.index, entry.key, entry.value, entry.revision)

    async def register(self, node: str, url: str) -> int:
        assert self._state is not None, "start the router first"
        self._urls[node] = url
        return await self._state.put(node_key(node), _node_record(node, url))

    async def leave(self, node: str) -> None:
        url = self._urls.get(node)
        if self._state is not None and url is not None:
            await self._state.put(node_key(node), _node_record(node, url, serving=False))

    async def remove(self, keys: Iterable[str]) -> None:
        assert self._state is not None, "start the router first"
        for key in keys:
            await self._state.delete(key)

    async def announce(self, event: PathAvailable) -> int:
        revision = await self._bus.record(event)
        await self._bus.publish(event, record=False)
        return revision

    async def stop(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.stop()


class MemoryState:
    """An in-process holder state: each key's last value, revisions, readers."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[bytes, int]] = {}
        self.revision = 0
        self.events: list[PathAvailable] = []
        self._readers: list[HolderIndex] = []

    def write(self, key: str, value: bytes | None) -> int:
        self.revision += 1
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = (value, self.revision)
        for index in self._readers:
            apply_record(index, key, value, self.revision)
        return self.revision

    def attach(self, index: HolderIndex) -> None:
        for key, (value, revision) in sorted(self.values.items(), key=lambda kv: kv[1][1]):
            apply_record(index, key, value, revision)
        self._readers.append(index)

    def detach(self, index: HolderIndex) -> None:
        if index in self._readers:
            self._readers.remove(index)


class MemoryRouter:
    """The router over a `MemoryState` (tests: many nodes, no server)."""

    def __init__(self, state: MemoryState, index: HolderIndex | None = None) -> None:
        self.state = state
        self.index = index if index is not None else HolderIndex()
        self._urls: dict[str, str] = {}
        self._started = False

    @property
    def caught_up(self) -> bool:
        return self._started

    async def start(self) -> None:
        self.state.attach(self.index)
        self._started = True

    async def register(self, node: str, url: str) -> int:
        self._urls[node] = url
        return self.state.write(node_key(node), _node_record(node, url))

    async def leave(self, node: str) -> None:
        if node in self._urls:
            self.state.write(node_key(node), _node_record(node, self._urls[node], serving=False))

    async def remove(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.state.write(key, None)

    async def announce(self, event: PathAvailable) -> int:
        self.state.events.append(event)
        return self.state.write(event.state_key, None if event.clears_state else encode(event))

    async def stop(self) -> None:
        self.state.detach(self.index)
        self._started = False


def _node_record(node: str, url: str, *, serving: bool = True) -> bytes:
    return NodeRecord(node=node, url=url, serving=serving).model_dump_json().encode()
