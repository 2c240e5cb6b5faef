"""Streams and durable consumers, declared once and provisioned idempotently.

One stream per subject so each can be sized and inspected on its own; limits retention (not
work-queue) because several services consume the same subject (build.done: operator and mesh).
Poison messages go to `DEAD_LETTERS` under `dead.<subject>`, where `niphas events` finds them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError, ServiceUnavailableError

from niphas_common.settings import ELECTION_WAIT_S, NatsSettings
from niphas_schemas import SUBJECTS, PushReceived

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a JetStream request meets while a cluster elects a leader (a server just left).
ELECTION_ERRORS = (
    NatsTimeoutError,
    asyncio.TimeoutError,
    ServiceUnavailableError,
    NoRespondersError,
)

DEAD_LETTER_STREAM = "DEAD_LETTERS"
DEAD_LETTER_PREFIX = "dead."


def stream_name(subject: str) -> str:
    """`push.received` -> `PUSH_RECEIVED`."""
    return subject.replace(".", "_").upper()


def stream_subjects(subject: str) -> list[str]:
    """What the stream of `subject` holds: the subject, and for a routed event (one subject
    per recipient, `path.wanted.<node>`) every subject below it too."""
    return [subject, f"{subject}.>"] if SUBJECTS[subject].routed else [subject]


def dead_letter_subject(subject: str) -> str:
    return f"{DEAD_LETTER_PREFIX}{subject}"


def stream_configs(settings: NatsSettings) -> list[StreamConfig]:
    common = {
        "retention": RetentionPolicy.LIMITS,
        "storage": StorageType.FILE,
        "discard": DiscardPolicy.OLD,
        "num_replicas": settings.replicas,
        "duplicate_window": settings.duplicate_window_s,
        "max_age": settings.max_age_days * 86400.0,
    }
    configs = [
        StreamConfig(
            name=stream_name(subject),
            subjects=stream_subjects(subject),
            **{**common, "duplicate_window": _duplicate_window(subject, settings)},  # type: ignore[arg-type]
        )
        for subject in SUBJECTS
    ]
    configs.append(
        StreamConfig(
            name=DEAD_LETTER_STREAM,
            subjects=[f"{DEAD_LETTER_PREFIX}>"],
            description="Events no handler could use, kept for people to inspect",
            **{**common, "max_age": 30 * 86400.0},  # type: ignore[arg-type]
        )
    )
    return configs


def _duplicate_window(subject: str, settings: NatsSettings) -> float:
    """push.received remembers delivery ids for longer: a webhook a forge re-sends late must
    not pass for a new push (it would look newer than the ref's real head), and pushes are few.
    Never longer than the stream keeps its messages."""
    window = settings.duplicate_window_s
    if subject == PushReceived.subject:
        window = max(window, settings.push_duplicate_window_s)
    return min(window, settings.max_age_days * 86400.0)


async def through_elections(request: Callable[[], Awaitable[T]], what: str, wait_s: float) -> T:
    """`request()`, tried again for up to `wait_s` while the cluster has no leader for it.

    A service starting (or a consumer made) during an election would otherwise fail on the
    first timeout, although the cluster answers again a few seconds later."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await request()
        except ELECTION_ERRORS as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("%s: no JetStream leader yet (%r), trying again", what, exc)
            await asyncio.sleep(0.5)


async def ensure_streams(js: JetStreamContext, settings: NatsSettings) -> None:
    """Create each stream, or bring an existing one to the declared config."""
    for config in stream_configs(settings):
        await through_elections(
            partial(_ensure_stream, js, config), f"stream {config.name}", settings.election_wait_s
        )


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    assert config.name is not None
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        log.info("created stream %s (%s)", config.name, ", ".join(config.subjects or []))
    else:
        await js.update_stream(config)


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer of one subject, shared by every replica of a service."""

    durable: str
    subject: str
    filter: str | None = None
    """The subject the consumer takes, when narrower than `subject` (one recipient's
    `path.wanted.<node>`); the stream stays `subject`'s."""
    ack_wait_s: float = 30.0
    max_deliver: int = 8
    backoff_s: tuple[float, ...] = field(default=(1.0, 2.0, 5.0, 15.0, 30.0, 60.0))
    max_ack_pending: int = 1024

    @property
    def stream(self) -> str:
        return stream_name(self.subject)

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable,
            filter_subject=self.filter or self.subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=self.max_ack_pending,
        )

    def delay_for(self, delivered: int) -> float:
        """Backoff before delivery number `delivered + 1`."""
        if not self.backoff_s:
            return 0.0
        return self.backoff_s[min(delivered - 1, len(self.backoff_s) - 1)]


async def ensure_consumer(
    js: JetStreamContext, spec: ConsumerSpec, *, wait_s: float = ELECTION_WAIT_S
) -> None:
    """Create the durable consumer of `spec`, or update it, through leader elections."""
    await through_elections(partial(_ensure_consumer, js, spec), f"consumer {spec.durable}", wait_s)


async def _ensure_consumer(js: JetStreamContext, spec: ConsumerSpec) -> None:
    try:
        await js.consumer_info(spec.stream, spec.durable)
    except NotFoundError:
        await js.add_consumer(spec.stream, spec.config())
        log.info("created consumer %s on %s", spec.durable, spec.stream)
    else:
        await js.add_consumer(spec.stream, spec.config())  # an update when the config changed
