"""Pull requests to a durable consumer, the messages handed to a callback as they arrive.

nats-py's `PullSubscription.fetch` reads each message of a batch through `next_msg`, which
starts two tasks, a timer and a uuid per message: ~20 us, a third of what a whole publish ->
consume -> ack of a 1 KB event costs. Here the answer flows into a subscription callback (one
queue read per message) and the caller takes each message as it comes.

The protocol is JetStream's own: a request `{"batch": n, "expires": ns}` on
`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` with our inbox as reply; the server sends up
to n messages there as they become available and ends the request early with a status
message: 408 when it expired, 404 when there is nothing (it does not wait then), 409 for a
conflict (the consumer was deleted or changed leader, too many waiting requests), 503 when
no server answers for the consumer (a cluster electing its leader).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DEFAULT_PREFIX, Header, StatusCode
from nats.js.errors import ServiceUnavailableError

log = logging.getLogger(__name__)

LOST_AFTER_S = 1.0
"""How long past its expiry a request may stay unanswered before it is taken as lost (the
connection dropped meanwhile: the server forgot it) and the caller asks again."""


class Pull:
    """One durable consumer's pull requests, one at a time, over one inbox."""

    def __init__(self, nc: Client, stream: str, durable: str, deliver: Callable[[Msg], None]):
        self._nc = nc
        self._subject = f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._durable = durable
        self._deliver = deliver
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._wanted = 0  # messages the current request may still bring
        self._answered = asyncio.Event()
        self._unavailable: str | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._arrived)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def request(self, batch: int, expires_s: float) -> None:
        """Ask for up to `batch` messages, each handed to `deliver` as it arrives; return
        once the request is over (all came, it expired, the server ended it, or it was lost).
        Raises `ServiceUnavailableError` when no server answers for the consumer."""
        self._wanted = batch
        self._unavailable = None
        self._answered.clear()
        body = {"batch": batch, "expires": int(expires_s * 1_000_000_000)}
        await self._nc.publish(self._subject, json.dumps(body).encode(), reply=self._inbox)
        try:
            async with asyncio.timeout(expires_s + LOST_AFTER_S):
                await self._answered.wait()
        except TimeoutError:
            log.debug("%s: pull request unanswered, asking again", self._durable)
        if self._unavailable is not None:
            raise ServiceUnavailableError(code=503, description=self._unavailable)

    async def _arrived(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get(Header.STATUS) if headers and not msg.data else None
        if status is None:
            self._wanted -= 1
            self._deliver(msg)
            if self._wanted <= 0:
                self._answered.set()
            return
        if status == StatusCode.CONTROL_MESSAGE:  # an idle heartbeat: the request goes on
            return
        description = (headers or {}).get(Header.DESCRIPTION, "")
        if status == StatusCode.SERVICE_UNAVAILABLE:
            self._unavailable = description or "no responders"
        elif status == StatusCode.CONFLICT:
            log.info("%s: pull request ended: %s %s", self._durable, status, description)
        # 404 and 408 (nothing now, expired) end a request as expected.
        self._answered.set()
