"""`Bus`: one NATS connection with its JetStream context, publisher and consumers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from niphas_common.bus.connection import connect
from niphas_common.bus.consumer import EventConsumer, Subscription
from niphas_common.bus.publisher import Publisher
from niphas_common.bus.topology import ensure_consumer, ensure_streams
from niphas_common.metrics import EVENTS_PUBLISHED
from niphas_common.settings import NatsSettings
from niphas_schemas import Event

log = logging.getLogger(__name__)


class Bus:
    def __init__(self, nc: Client, settings: NatsSettings) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.settings = settings
        self.publisher = Publisher(self.js)

    @classmethod
    async def connect(cls, settings: NatsSettings, *, name: str, provision: bool = True) -> Bus:
        """Connect and (by default) make sure every stream exists, so publishing cannot
        fail for a missing stream whichever service starts first."""
        bus = cls(await connect(settings, name=name), settings)
        if provision:
            await ensure_streams(bus.js, settings)
        return bus

    async def publish(self, event: Event) -> PubAck:
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
            await ensure_consumer(self.js, sub.spec)
        consumers = [
            EventConsumer(self.js, sub, fetch_timeout_s=fetch_timeout_s) for sub in subscriptions
        ]
        async with asyncio.TaskGroup() as group:
            for consumer in consumers:
                group.create_task(consumer.run(stop), name=consumer.name)

    async def close(self) -> None:
        """Drain: flush what was published, stop subscriptions, then disconnect."""
        if not self.nc.is_closed:
            await self.nc.drain()
