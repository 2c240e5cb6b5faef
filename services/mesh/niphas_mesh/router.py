"""Where holders are learned and holdings told: the `Router` behind the fetcher, the
collector and the agent's announcements.

A router keeps a `HolderIndex` in step with every `path.available` event (the index is
rebuilt from the first stored event at start, then follows new ones) and announces this
node's own events, returning each one's stream sequence (which orders concurrent `fetching`
announcements, see `HolderIndex.fetchers`).

`BusRouter` does this over NATS. `MemoryRouter` is its in-process twin for tests without a
server: routers created from one `MemoryStream` see each other's announcements at once, in
one sequence, as agents sharing a NATS server do. Both pass the same conformance tests
(tests/niphas_mesh/test_router.py).
"""

from __future__ import annotations

from typing import Protocol

from niphas_common.bus.bus import Bus
from niphas_common.bus.watch import Watch
from niphas_schemas import PathAvailable

from .index import HolderIndex


class Router(Protocol):
    index: HolderIndex

    @property
    def caught_up(self) -> bool:
        """Whether every event stored before the start has reached the index."""
        ...

    async def start(self) -> None: ...

    async def announce(self, event: PathAvailable) -> int:
        """Publish `event`; its stream sequence."""
        ...

    async def stop(self) -> None: ...


class BusRouter:
    """The router over the `path.available` stream."""

    def __init__(self, bus: Bus, index: HolderIndex | None = None) -> None:
        self._bus = bus
        self.index = index or HolderIndex()
        self._watch: Watch[PathAvailable] | None = None

    @property
    def caught_up(self) -> bool:
        return self._watch is not None and self._watch.caught_up

    async def start(self) -> None:
        self._watch = await self._bus.watch(PathAvailable, self._apply, replay=True)

    async def _apply(self, event: PathAvailable, seq: int) -> None:
        self.index.apply(event, seq)

    async def announce(self, event: PathAvailable) -> int:
        ack = await self._bus.publish(event)
        return int(ack.seq)

    async def stop(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.stop()


class MemoryStream:
    """An in-process `path.available` stream: every event, its sequence, its readers."""

    def __init__(self) -> None:
        self.events: list[PathAvailable] = []
        self._readers: list[HolderIndex] = []

    def append(self, event: PathAvailable) -> int:
        self.events.append(event)
        seq = len(self.events)
        for index in self._readers:
            index.apply(event, seq)
        return seq

    def attach(self, index: HolderIndex) -> None:
        for seq, event in enumerate(self.events, start=1):
            index.apply(event, seq)
        self._readers.append(index)

    def detach(self, index: HolderIndex) -> None:
        if index in self._readers:
            self._readers.remove(index)


class MemoryRouter:
    """The router over a `MemoryStream` (tests: many nodes, no server)."""

    def __init__(self, stream: MemoryStream, index: HolderIndex | None = None) -> None:
        self.stream = stream
        self.index = index or HolderIndex()
        self._started = False

    @property
    def caught_up(self) -> bool:
        return self._started

    async def start(self) -> None:
        self.stream.attach(self.index)
        self._started = True

    async def announce(self, event: PathAvailable) -> int:
        return self.stream.append(event)

    async def stop(self) -> None:
        self.stream.detach(self.index)
        self._started = False
