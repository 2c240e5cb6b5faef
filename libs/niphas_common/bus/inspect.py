"""Reading the bus without disturbing it: streams, consumers, stored messages, live tail.

There is no `nats` CLI to install here, so `niphas events` is built on these. Viewing uses the
stream's message-get API and tailing an ephemeral ordered consumer: durable consumers (the
services' queues) are never touched.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, DeliverPolicy, RawStreamMsg, StreamInfo
from nats.js.errors import NotFoundError


@dataclass(frozen=True)
class StoredMessage:
    stream: str
    sequence: int
    subject: str
    time: datetime | None
    headers: dict[str, str]
    data: bytes


async def streams(js: JetStreamContext) -> list[StreamInfo]:
    infos: list[StreamInfo] = await js.streams_info()
    return sorted(infos, key=lambda info: info.config.name or "")


async def consumers(js: JetStreamContext, stream: str) -> list[ConsumerInfo]:
    infos: list[ConsumerInfo] = await js.consumers_info(stream)
    return sorted(infos, key=lambda info: info.name)


async def stream_for(js: JetStreamContext, subject: str) -> str:
    try:
        name: str = await js.find_stream_name_by_subject(subject)
    except NotFoundError:
        raise LookupError(f"no stream holds subject {subject!r}") from None
    return name


async def view(js: JetStreamContext, subject: str, last: int = 10) -> list[StoredMessage]:
    """The last `last` messages stored on `subject` (wildcards allowed), oldest first. A
    stream's own subject means the whole stream (`path.wanted`: every node's wants)."""
    stream = await stream_for(js, subject)
    info = await js.stream_info(stream)
    first, final = info.state.first_seq, info.state.last_seq
    out: deque[StoredMessage] = deque(maxlen=max(last, 1))
    if info.state.messages == 0:
        return []
    if (info.config.subjects or [""])[0] == subject:
        # The stream's own subject: the last N sequences are the last N messages.
        for seq in range(max(first, final - last + 1), final + 1):
            try:
                raw = await js.get_msg(stream, seq)
            except NotFoundError:
                continue
            out.append(_stored(stream, raw))
    else:
        seq = first
        while seq <= final:
            try:
                raw = await js.get_msg(stream, seq, subject=subject, next=True)
            except NotFoundError:
                break
            out.append(_stored(stream, raw))
            seq = (raw.seq or seq) + 1
    return list(out)[-last:] if last > 0 else []


async def tail(js: JetStreamContext, subject: str) -> AsyncIterator[StoredMessage]:
    """New messages on `subject` as they are stored, until cancelled."""
    stream = await stream_for(js, subject)
    subjects = (await js.stream_info(stream)).config.subjects or []
    if subjects[:1] == [subject] and f"{subject}.>" in subjects:
        subject = f"{subject}.>"  # a routed event: every recipient's subject
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=3600)
            except TimeoutError:
                continue
            meta = msg.metadata
            yield StoredMessage(
                stream, meta.sequence.stream, msg.subject, meta.timestamp,
                dict(msg.headers or {}), msg.data,
            )  # fmt: skip
    finally:
        await sub.unsubscribe()


def _stored(stream: str, raw: RawStreamMsg) -> StoredMessage:
    return StoredMessage(
        stream=stream,
        sequence=raw.seq or 0,
        subject=raw.subject or "",
        time=raw.time,
        headers=dict(raw.headers or {}),
        data=raw.data or b"",
    )
