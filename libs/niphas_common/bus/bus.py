"""`Bus`: one NATS connection with its JetStream context, publisher and consumers.

Services reach NATS only through a `Bus`: publish an event, serve durable consumers, watch a
subject (`watch`), open a key-value bucket (`key_value`) or a bucket of state with no age
limit (`state`), and read the connection's state (`connected`, `max_payload`,
`stream_available`). An event that states something current (`Event.state_bucket`, e.g. who
holds a path) is written to its bucket as well as published (`record`). `nc` and `js` stay
for the library itself and for tests; import-linter forbids services to import `nats`, and a
test forbids them `.nc`/`.js`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from niphas_common.bus.codec import encode
from niphas_common.bus.connection import close_quietly, connect
from niphas_common.bus.consumer import EventConsumer, Subscription
from niphas_common.bus.kv import BusError, KeyValue, open_bucket
from niphas_common.bus.publisher import Publisher, PublishError
from niphas_common.bus.state import State
from niphas_common.bus.topology import (
    ensure_consumer,
    ensure_streams,
    stream_name,
    through_elections,
)
from niphas_common.bus.watch import E, Handler, Watch
from niphas_common.metrics import EVENTS_PUBLISHED
from niphas_common.settings import NatsSettings
from niphas_schemas import Event

log = logging.getLogger(__name__)


class Bus:
    def __init__(self, nc: Client, settings: NatsSettings) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.settings = settings
        self.publisher = Publisher(self.js, timeout_s=settings.publish_timeout_s)
        self._states: dict[str, State] = {}

    @classmethod
    async def connect(cls, settings: NatsSettings, *, name: str, provision: bool = True) -> Bus:
        """Connect and (by default) make sure every stream exists, so publishing cannot
        fail for a missing stream whichever service starts first."""
        bus = cls(await connect(settings, name=name), settings)
        if provision:
            try:
                await ensure_streams(bus.js, settings)
            except BaseException:
                await close_quietly(bus.nc)
                raise
        return bus

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now (it reconnects by itself when it is not)."""
        return bool(self.nc.is_connected)

    @property
    def max_payload(self) -> int:
        """The largest message, in bytes, the server accepts."""
        return int(self.nc.max_payload)

    async def stream_available(self, subject: str, timeout_s: float = 2.0) -> str | None:
        """None when the stream of `subject` answers within `timeout_s`, else why not."""
        stream = stream_name(subject)
        try:
            await asyncio.wait_for(self.js.stream_info(stream), timeout_s)
        except Exception as exc:
            return f"stream {stream} unavailable ({exc.__class__.__name__})"
        return None

    async def key_value(
        self, bucket: str, *, ttl_s: float, description: str, replicas: int = 1
    ) -> KeyValue:
        """The key-value bucket `bucket`, created when missing (see `kv.open_bucket`)."""
        return await open_bucket(
            self.js, bucket, ttl_s=ttl_s, description=description, replicas=replicas
        )

    async def state(self, name: str, *, description: str = "") -> State:
        """The state bucket `name` (no age limit), created when missing (see `state.State`)."""
        state = self._states.get(name)
        if state is None:
            state = await through_elections(
                partial(
                    State.open, self.nc, self.js, name,
                    description=description, replicas=self.settings.replicas,
                ),
                f"bucket {name}",
                self.settings.election_wait_s,
            )  # fmt: skip
            self._states[name] = state
        return state

    async def record(self, event: Event) -> int:
        """Write what `event` states to its bucket (set or delete its key); the revision."""
        assert event.state_bucket is not None, f"{event.subject} states nothing"
        try:
            state = await self.state(event.state_bucket, description=f"latest {event.subject}")
            if event.clears_state:
                return await state.delete(event.state_key)
            return await state.put(event.state_key, encode(event))
        except (TimeoutError, BusError) as exc:  # as a publish that was not stored
            raise PublishError(
                f"{event.state_bucket} {event.state_key}: not stored ({exc!r})"
            ) from exc

    async def watch(self, model: type[E], handler: Handler[E], *, replay: bool) -> Watch[E]:
        """Start a typed watch of `model`'s subject (see `watch.Watch`); stop it when done."""
        watch = Watch(self.js, model, handler)
        await watch.start(replay=replay)
        return watch

    async def publish(self, event: Event, *, record: bool = True) -> PubAck:
        """Store `event` on its stream; an event that states something current is written
        to its state bucket first (unless `record` is False: the caller did already)."""
        if record and event.state_bucket is not None:
            await self.record(event)
        ack = await self.publisher.publish(event)
        EVENTS_PUBLISHED.labels(event.subject, str(ack.duplicate or False).lower()).inc()
        return ack

    async def serve(
        self,
        subscriptions: Sequence[Subscription[Any]],
        stop: asyncio.Event,
        *,
        fetch_timeout_s: float = 1.0,
    ) -> None:
        """Provision each durable consumer and run them until `stop` is set."""
        for sub in subscriptions:
            await ensure_consumer(self.js, sub.spec, wait_s=self.settings.election_wait_s)
        consumers = [
            EventConsumer(self.nc, self.js, sub, fetch_timeout_s=fetch_timeout_s)
            for sub in subscriptions
        ]
        async with asyncio.TaskGroup() as group:
            for consumer in consumers:
                group.create_task(consumer.run(stop), name=consumer.name)

    async def close(self) -> None:
        """Drain: flush what was published, stop subscriptions, then disconnect. A drain that
        fails (reconnecting, the server gone mid-flush) still closes the socket: nats-py
        skips its own close then, leaving the socket to the garbage collector."""
        try:
            if not self.nc.is_closed:
                await self.nc.drain()
        finally:
            await close_quietly(self.nc)
