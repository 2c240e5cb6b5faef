"""A typed watch of one subject: every event stored on it, in stream order, as it arrives.

Unlike a durable consumer (`Bus.serve`), a watch is ephemeral and ordered: nothing is
acknowledged, nothing is redelivered, and a process that restarts watches again. `replay`
starts from the first stored event (to rebuild state kept in memory, as the mesh's holder
index does), otherwise from the next one (to hear answers to a question about to be asked,
as the csi's wants do). An event that does not decode is logged and skipped, never handled.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from niphas_common.bus.codec import decode
from niphas_common.bus.topology import stream_name
from niphas_common.errors import PoisonMessage
from niphas_schemas import Event

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)

Handler = Callable[[E, int], Awaitable[None]]
"""Called with each event and its stream sequence, one at a time, in order."""


class Watch(Generic[E]):
    def __init__(self, js: JetStreamContext, model: type[E], handler: Handler[E]) -> None:
        self._js = js
        self.model = model
        self._handler = handler
        self._sub: Any = None
        self.start_seq = 0
        """The stream's last sequence when the watch started (0 for an empty stream)."""
        self.last_seq = 0
        """The sequence of the last event seen, handled or skipped."""

    @property
    def caught_up(self) -> bool:
        """Whether everything stored before the watch started has been seen."""
        return self.last_seq >= self.start_seq

    async def start(self, *, replay: bool) -> None:
        subject = self.model.subject
        if replay:
            try:
                info = await self._js.stream_info(stream_name(subject))
                self.start_seq = info.state.last_seq
            except NotFoundError:
                self.start_seq = 0
        self._sub = await self._js.subscribe(
            subject,
            cb=self._on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL if replay else DeliverPolicy.NEW,
        )

    async def _on_msg(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        try:
            event = decode(self.model, msg.data)
        except PoisonMessage as exc:
            log.warning("skipping unreadable %s #%d: %s", self.model.subject, seq, exc)
            self.last_seq = max(self.last_seq, seq)
            return
        self.last_seq = max(self.last_seq, seq)
        await self._handler(event, seq)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
