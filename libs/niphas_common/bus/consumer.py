"""Running a handler over a durable pull consumer with at-least-once semantics.

Per message: decode -> handler -> ack. A `PermanentError` (a `PoisonMessage` included: not
JSON, not the model, unknown schema version) is recorded in `DEAD_LETTERS` and terminated at
once. Anything else is retried with `nak(delay)` following the consumer's backoff, and after
`max_deliver` deliveries recorded and terminated too, so no message loops forever. A handler that
runs long is kept alive with in-progress acks; a process killed mid-handler leaves the message
unacked, and JetStream redelivers it to another instance after `ack_wait`.

Built on nats-py rather than a faststream subscriber: the semantics above (nak with a delay
chosen per delivery count, dead-letter-then-term, in-progress heartbeats for long handlers,
bounded concurrency per consumer, drain on stop) are each one call here; the pull requests
themselves are `pull.Pull` (cheaper per message than nats-py's `fetch`). faststream is used
where it fits: the AsyncAPI document (`schema_export`). `bench/bench_spine.py` measures a
faststream pull subscriber beside this consumer on the same server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import ServiceUnavailableError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from niphas_common import tracing
from niphas_common.bus.codec import HEADER_EVENT_ID, decode
from niphas_common.bus.dead_letters import record_dead_letter
from niphas_common.bus.pull import Pull
from niphas_common.bus.topology import ConsumerSpec
from niphas_common.errors import PermanentError
from niphas_common.logs import current_event_id
from niphas_common.metrics import (
    CONSUMER_ACK_PENDING,
    CONSUMER_PENDING,
    EVENTS_HANDLED,
    HANDLER_SECONDS,
)
from niphas_schemas import Event

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)

BATCH_WAIT_S = 0.05
"""While every handler slot is busy, how long a consumer waits for a batch of them to free
before it fetches for fewer (see `EventConsumer._room`)."""

PENDING_REPORT_S = 5.0
"""Seconds between reads of the consumer's pending counts (one `consumer_info` request each):
queue depth on /metrics, so a wedged queue shows without anyone asking the server."""


class Delivery(NamedTuple):
    """What a handler may want to know about the message beside the event (immutable; a
    tuple rather than a frozen dataclass, which cost a microsecond more per event)."""

    subject: str
    stream_sequence: int
    num_delivered: int
    headers: Mapping[str, str]


Handler = Callable[[E, Delivery], Awaitable[None]]


@dataclass(frozen=True)
class Subscription(Generic[E]):
    """A handler bound to a model and a durable consumer."""

    model: type[E]
    spec: ConsumerSpec
    handler: Handler[E]
    concurrency: int = 64


class EventConsumer(Generic[E]):
    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        subscription: Subscription[E],
        *,
        fetch_timeout_s: float = 1.0,
        drain_grace_s: float = 30.0,
    ) -> None:
        self._nc = nc
        self._js = js
        self._sub = subscription
        self._fetch_timeout_s = fetch_timeout_s
        self._drain_grace_s = drain_grace_s
        self._in_flight: dict[int, tuple[Msg, float]] = {}  # by id(): Msg is unhashable
        spec = subscription.spec
        self._acked = EVENTS_HANDLED.labels(spec.subject, spec.durable, "acked")
        self._handler_seconds = HANDLER_SECONDS.labels(spec.subject, spec.durable)
        self._span_name = f"process {spec.subject}"  # path.wanted, whichever node's it is
        self._queue: deque[Msg] = deque()  # fetched, no handler started yet
        self._unsettled = 0  # fetched and not yet acked, retried or terminated
        self._workers: set[asyncio.Task[None]] = set()
        self._working = 0  # workers that have not returned yet
        self._stuck_check = False  # `_unstick` scheduled
        self._starting = False  # a worker was started and has not taken a message yet
        self._freed = asyncio.Event()  # set when a message is settled

    @property
    def name(self) -> str:
        return self._sub.spec.durable

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and handle until `stop` is set, then let in-flight handlers finish."""
        spec = self._sub.spec
        pull = Pull(self._nc, spec.stream, spec.durable, self._arrived)
        await pull.start()
        heartbeat = asyncio.create_task(self._heartbeat(stop), name=f"{spec.durable}-heartbeat")
        pending = asyncio.create_task(self._report_pending(), name=f"{spec.durable}-pending")
        try:
            while not stop.is_set():
                free = await self._room()
                if stop.is_set():
                    break
                try:
                    await pull.request(free, self._fetch_timeout_s)
                except ServiceUnavailableError as exc:
                    # 503: the consumer is electing its leader (a server of a cluster left);
                    # it answers again once one is elected.
                    log.info("%s: consumer unavailable (%s), fetching again", spec.durable, exc)
                    await asyncio.sleep(self._fetch_timeout_s)
        finally:
            await self._drain()
            heartbeat.cancel()
            pending.cancel()
            await pull.stop()

    def _arrived(self, msg: Msg) -> None:
        self._queue.append(msg)
        self._unsettled += 1
        # One worker takes what arrives in a burst; `_unstick` adds more if it has to wait.
        if not self._starting and self._spawn(1):
            self._starting = True

    async def _drain(self) -> None:
        """Let the fetched messages be settled, for up to the drain grace."""
        if not self._workers:
            return
        log.info("%s: draining %d in-flight events", self.name, self._unsettled)
        deadline = asyncio.get_running_loop().time() + self._drain_grace_s
        # Again while workers remain: a handler that awaits hands queued messages to new ones.
        while self._workers and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.wait(set(self._workers), timeout=left)

    def _spawn(self, wanted: int) -> int:
        """Start up to `wanted` more workers, never more than the consumer's concurrency;
        how many were started."""
        started = min(wanted, self._sub.concurrency - self._working, len(self._queue))
        for _ in range(started):
            self._working += 1
            worker = asyncio.create_task(self._work())
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
        return max(started, 0)

    def _unstick(self) -> None:
        """Runs once the loop got control back from a worker: messages still queued then
        wait behind a handler that is awaiting something, so each gets a worker of its own."""
        self._stuck_check = False
        self._spawn(len(self._queue))

    async def _work(self) -> None:
        """Handle queued messages one after the other. A task per message cost as much as
        a quick handler itself; a handler that awaits leaves the rest to other workers
        (`_unstick`), so up to `concurrency` handlers still run at once."""
        queue = self._queue
        self._starting = False
        try:
            while queue:
                msg = queue.popleft()
                if queue and not self._stuck_check:
                    self._stuck_check = True
                    asyncio.get_running_loop().call_soon(self._unstick)
                try:
                    await self._handle(msg)
                except Exception:
                    # Acking or nak'ing failed (connection lost): JetStream redelivers after
                    # ack_wait.
                    log.exception("%s: could not settle message", self._sub.spec.durable)
                finally:
                    self._unsettled -= 1
                    self._freed.set()
        finally:
            self._working -= 1

    async def _room(self) -> int:
        """Free handler slots to fetch for: a batch (a quarter of them), or fewer but not
        none once BATCH_WAIT_S passed. Each fetch is a round trip to the server: fetching
        one message per finished handler cost more than handling it, under a backlog."""
        loop = asyncio.get_running_loop()
        concurrency = self._sub.concurrency
        batch = max(1, concurrency // 4)
        deadline = loop.time() + BATCH_WAIT_S
        while True:
            free = concurrency - self._unsettled
            if free >= batch or (free > 0 and loop.time() >= deadline):
                return free
            self._freed.clear()
            try:
                async with asyncio.timeout(deadline - loop.time() if free > 0 else None):
                    await self._freed.wait()
            except TimeoutError:
                pass

    async def _report_pending(self) -> None:
        spec = self._sub.spec
        depth = CONSUMER_PENDING.labels(spec.stream, spec.durable)
        in_handling = CONSUMER_ACK_PENDING.labels(spec.stream, spec.durable)
        while True:
            try:
                info = await self._js.consumer_info(spec.stream, spec.durable)
            except Exception:  # reconnecting: the next read catches up
                log.debug("consumer_info of %s failed", spec.durable, exc_info=True)
            else:
                depth.set(info.num_pending or 0)
                in_handling.set(info.num_ack_pending or 0)
            await asyncio.sleep(PENDING_REPORT_S)

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        """Tell JetStream that long handlers are still working, so it does not redeliver."""
        period = self._sub.spec.ack_wait_s / 3
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for msg, started in list(self._in_flight.values()):
                if now - started >= period:
                    try:
                        await msg.in_progress()
                    except Exception:  # the connection may be reconnecting; JetStream redelivers
                        log.debug("in-progress ack failed", exc_info=True)

    async def _handle(self, msg: Msg) -> None:
        meta = msg.metadata
        delivered = meta.num_delivered
        headers = msg.headers or {}
        delivery = Delivery(msg.subject, meta.sequence.stream, delivered, headers)
        event_token = current_event_id.set(headers.get(HEADER_EVENT_ID))
        started = time.monotonic()
        self._in_flight[id(msg)] = (msg, started)
        # One attach/detach rather than nested context managers: at a few microseconds per
        # event, those were a tenth of the spine's cost.
        span = self._start_span(msg, headers, delivered) if tracing.recording() else None
        carried = tracing.extract(headers) if span is None else trace.set_span_in_context(span)
        # Tracing off: the sender's trace context only, no span nobody records.
        trace_token = otel_context.attach(carried)
        try:
            failure = await self._settle(msg, delivery)
            if span is not None and failure is not None:
                span.set_status(Status(StatusCode.ERROR, failure))
        except BaseException as exc:
            if span is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            otel_context.detach(trace_token)
            if span is not None:
                span.end()
            self._in_flight.pop(id(msg), None)
            self._handler_seconds.observe(time.monotonic() - started)
            current_event_id.reset(event_token)

    def _start_span(self, msg: Msg, headers: Mapping[str, str], delivered: int) -> trace.Span:
        spec = self._sub.spec
        return tracing.tracer().start_span(
            self._span_name,
            context=tracing.extract(headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.consumer.group.name": spec.durable,
                "messaging.message.delivery_count": delivered,
            },
        )

    async def _settle(self, msg: Msg, delivery: Delivery) -> str | None:
        """Decode, handle, then ack, retry or dead-letter; what failed, None when acked."""
        try:
            event = decode(self._sub.model, msg.data)
            await self._sub.handler(event, delivery)
        except PermanentError as exc:
            await self._dead(msg, str(exc), delivery.num_delivered)
            return str(exc)
        except Exception as exc:
            await self._retry_or_dead(msg, exc, delivery.num_delivered)
            return repr(exc)
        await msg.ack()
        self._acked.inc()
        return None

    async def _retry_or_dead(self, msg: Msg, exc: Exception, delivered: int) -> None:
        spec = self._sub.spec
        if delivered >= spec.max_deliver:
            await self._dead(msg, f"gave up after {delivered} deliveries: {exc!r}", delivered)
            return
        delay = spec.delay_for(delivered)
        log.warning(
            "%s #%d failed (delivery %d/%d), retrying in %.1fs: %r",
            msg.subject, msg.metadata.sequence.stream, delivered, spec.max_deliver, delay, exc,
        )  # fmt: skip
        await msg.nak(delay=delay)
        EVENTS_HANDLED.labels(msg.subject, spec.durable, "retried").inc()

    async def _dead(self, msg: Msg, reason: str, delivered: int) -> None:
        spec = self._sub.spec
        try:
            await record_dead_letter(
                self._js,
                subject=msg.subject,
                data=msg.data,
                headers=msg.headers,
                reason=reason,
                stream=spec.stream,
                sequence=msg.metadata.sequence.stream,
                deliveries=delivered,
                consumer=spec.durable,
            )
        except Exception:
            # Not recorded, so not terminated: it comes back and we try again.
            log.exception("could not record dead letter; leaving %s for redelivery", msg.subject)
            await msg.nak(delay=spec.delay_for(delivered))
            return
        log.error("%s #%d is dead: %s", msg.subject, msg.metadata.sequence.stream, reason)
        await msg.term()
        EVENTS_HANDLED.labels(msg.subject, spec.durable, "dead").inc()
