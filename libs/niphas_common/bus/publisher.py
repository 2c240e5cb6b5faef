"""Publishing events: always a deterministic `Nats-Msg-Id`, always a `traceparent`, always
waiting for JetStream's acknowledgement (an event is published only once it is stored)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError
from opentelemetry.trace import SpanKind

from niphas_common import tracing
from niphas_common.bus.codec import encode, headers_for
from niphas_common.bus.topology import stream_name
from niphas_common.errors import TransientError
from niphas_schemas import Event

log = logging.getLogger(__name__)


class PublishError(TransientError):
    """JetStream did not acknowledge the event (no stream, server down, timeout)."""


NO_ANSWER = (TimeoutError, NoRespondersError, NoStreamResponseError, NatsTimeoutError)
"""What a publish meets when no server stores the stream's messages right now: on a cluster
that lost quorum the stream has no leader, so nothing answers (at once) or no ack comes."""


def no_leader(stream: str, timeout_s: float, exc: BaseException) -> str:
    return (
        f"JetStream has no quorum/leader for stream {stream} ({exc.__class__.__name__}: no "
        f"acknowledgement within {timeout_s:g}s; or the stream does not exist)"
    )


class Publisher:
    def __init__(self, js: JetStreamContext, *, timeout_s: float) -> None:
        """`timeout_s`: how long a publish waits for its ack (NIPHAS_NATS_PUBLISH_TIMEOUT_S)."""
        self._js = js
        self._timeout_s = timeout_s

    async def publish(self, event: Event) -> PubAck:
        """Store one event; `PubAck.duplicate` is True when its Msg-Id was already stored."""
        if not tracing.recording():
            # Tracing off: the trace context only, no span that nobody records.
            return await self._store(event, tracing.carry(headers_for(event)))
        with tracing.tracer().start_as_current_span(
            f"publish {event.subject}",
            kind=SpanKind.PRODUCER,
            attributes=_span_attributes(event),
        ):
            return await self._store(event, tracing.inject(headers_for(event)))

    async def _store(self, event: Event, headers: dict[str, str]) -> PubAck:
        stream = stream_name(event.subject)
        try:
            ack = await self._js.publish(
                event.routed_subject,
                encode(event),
                timeout=self._timeout_s,
                stream=stream,
                headers=headers,
            )
        except NO_ANSWER as exc:
            raise PublishError(
                f"{event.subject} {event.msg_id}: not stored: "
                + no_leader(stream, self._timeout_s, exc)
            ) from exc
        except APIError as exc:
            raise PublishError(f"{event.subject} {event.msg_id}: not stored ({exc!r})") from exc
        if ack.duplicate:
            log.info("%s %s already stored (duplicate Msg-Id)", event.subject, event.msg_id)
        return ack

    async def publish_many(self, events: Iterable[Event], *, window: int = 256) -> list[PubAck]:
        """Pipelined publish: up to `window` events in flight, every ack awaited.

        One producer span covers the batch and is every event's parent (a span per event
        cost as much as the publish itself)."""
        acks: list[PubAck] = []
        pending: list[asyncio.Future[PubAck]] = []
        subjects: set[str] = set()  # of the events in flight, to name their streams in an error
        with tracing.tracer().start_as_current_span("publish batch", kind=SpanKind.PRODUCER):
            trace_headers = tracing.inject({})
            for event in events:
                headers = headers_for(event)
                headers.update(trace_headers)
                # No expected-stream header here: every consumer pays to parse each header,
                # and one subject maps to one stream anyway.
                pending.append(
                    await self._js.publish_async(
                        event.routed_subject, encode(event), headers=headers
                    )
                )
                subjects.add(event.subject)
                if len(pending) >= window:
                    acks.extend(await self._gather(pending, subjects))
                    pending, subjects = [], set()
            acks.extend(await self._gather(pending, subjects))
        return acks

    async def _gather(
        self, pending: list[asyncio.Future[PubAck]], subjects: set[str]
    ) -> list[PubAck]:
        try:
            return list(await asyncio.wait_for(asyncio.gather(*pending), timeout=self._timeout_s))
        except NO_ANSWER as exc:
            raise PublishError(
                f"batch of {len(pending)} events not stored: "
                + no_leader(", ".join(sorted(map(stream_name, subjects))), self._timeout_s, exc)
            ) from exc
        except APIError as exc:
            raise PublishError(f"batch of {len(pending)} events not stored ({exc!r})") from exc


def _span_attributes(event: Event) -> dict[str, str]:
    return {
        "messaging.system": "nats",
        "messaging.destination.name": event.subject,
        "messaging.message.id": event.msg_id,
        "niphas.event_id": event.event_id,
    }
