"""Current state with no age limit: a key-value bucket read as a whole, then followed.

Events may expire (`NIPHAS_NATS_MAX_AGE_DAYS`); what others must find later lives here, one
last value per key, kept until it is deleted. A `State` is one such bucket:

- `put`, `create`, `delete`, `get`: write or read one key (a write answers its revision, the
  bucket's stream sequence, which orders writes across every writer);
- `watch`: every key's last value from the start (deleted keys skipped), then every write as
  it is stored, in order, with `caught_up` once what was stored before the start has been
  seen (how a process builds its view of the state, e.g. the mesh's holder index);
- `listen`: only future writes of the given keys (core subscriptions on their subjects): a
  waiter that cares about a few keys never receives the rest.

Entries reach handlers as `Entry(key, value, revision)`, `value` None for a deletion.
Services use states through the `Bus` (`Bus.state`), never `nats` itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from niphas_common.bus.kv import KeyNotFound, KeyValue, RevisionMismatch, open_bucket

log = logging.getLogger(__name__)

_OPERATION = "KV-Operation"
_REMOVED = ("DEL", "PURGE")
MARKER_TTL_S = 86400.0
"""Seconds a deletion's marker is kept, for watchers that were reconnecting meanwhile (a
reader that starts later sees the key absent anyway); then it expires, so keys deleted over
months do not pile up as markers every new reader must skip."""


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes | None
    """None: the key was deleted."""
    revision: int


EntryHandler = Callable[[Entry], Awaitable[None]]
"""Called with each entry, one at a time, in revision order."""


class State:
    """One key-value bucket of current state, no age limit (see the module docstring)."""

    def __init__(self, nc: Client, js: JetStreamContext, kv: KeyValue, name: str) -> None:
        self._nc = nc
        self._js = js
        self._kv = kv
        self.name = name
        self.stream = f"KV_{name}"

    @classmethod
    async def open(
        cls, nc: Client, js: JetStreamContext, name: str, *, description: str, replicas: int = 1
    ) -> State:
        kv = await open_bucket(js, name, ttl_s=0, description=description, replicas=replicas)
        return cls(nc, js, kv, name)

    def subject(self, key: str) -> str:
        """The subject a write of `key` is stored on."""
        return f"$KV.{self.name}.{key}"

    async def put(self, key: str, value: bytes) -> int:
        return int(await self._kv.put(key, value))

    async def create(self, key: str, value: bytes) -> int | None:
        """Write `key` only if it holds no value; its revision, or None if it did."""
        try:
            return int(await self._kv.create(key, value))
        except RevisionMismatch:
            return None

    async def delete(self, key: str, *, marker_ttl_s: float = MARKER_TTL_S) -> int:
        """Delete `key`: a marker that watchers hear, itself gone after `marker_ttl_s`
        seconds; the marker's revision."""
        headers = {_OPERATION: "PURGE", "Nats-Rollup": "sub"}
        ack = await self._js.publish(self.subject(key), b"", headers=headers, msg_ttl=marker_ttl_s)
        return int(ack.seq)

    async def get(self, key: str) -> Entry | None:
        try:
            entry = await self._kv.get(key)
        except KeyNotFound:
            return None
        return Entry(key, entry.value or b"", int(entry.revision or 0))

    async def last_revision(self) -> int:
        info = await self._js.stream_info(self.stream)
        return int(info.state.last_seq)

    async def watch(self, handler: EntryHandler, *, keys: str = ">") -> StateWatch:
        """Start following the keys matching `keys` (a subject pattern below the bucket)."""
        watch = StateWatch(self, handler)
        await watch.start(keys)
        return watch

    async def listen(self, keys: Iterable[str], handler: EntryHandler) -> Listener:
        """Hear future writes of `keys` only (nothing stored before; a write while the
        connection is down is missed: a listener re-reads what it waits for now and then)."""
        listener = Listener(self, handler)
        for key in keys:
            listener.subs.append(await self._nc.subscribe(self.subject(key), cb=listener.on_msg))
        return listener

    def entry(self, msg: Msg, revision: int) -> Entry:
        key = msg.subject.removeprefix(f"$KV.{self.name}.")
        removed = (msg.headers or {}).get(_OPERATION) in _REMOVED
        return Entry(key, None if removed else msg.data, revision)


class StateWatch:
    """Every key's last value, then every write (an ordered consumer, nothing acked)."""

    def __init__(self, state: State, handler: EntryHandler) -> None:
        self._state = state
        self._handler = handler
        self._sub: Any = None
        self.start_seq = 0
        """The bucket's last revision when the watch started."""
        self.last_seq = 0
        """The revision of the last entry seen."""
        self.entries = 0
        """Entries handed to the handler so far."""

    @property
    def caught_up(self) -> bool:
        return self.last_seq >= self.start_seq

    async def start(self, keys: str) -> None:
        try:
            self.start_seq = await self._state.last_revision()
        except NotFoundError:
            self.start_seq = 0
        self._sub = await self._state._js.subscribe(
            self._state.subject(keys),
            cb=self._on_msg,
            ordered_consumer=True,
            # One value per key (history 1): every stored message is a key's last value, and
            # reading them in order is cheaper for the server than asking for the last per key.
            deliver_policy=DeliverPolicy.ALL,
        )

    async def _on_msg(self, msg: Msg) -> None:
        seq = int(msg.metadata.sequence.stream)
        entry = self._state.entry(msg, seq)
        self.last_seq = max(self.last_seq, seq)
        if entry.value is None and seq <= self.start_seq:
            return  # deleted before we looked: nothing to forget
        self.entries += 1
        await self._handler(entry)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class Listener:
    """Future writes of a few keys (see `State.listen`)."""

    def __init__(self, state: State, handler: EntryHandler) -> None:
        self._state = state
        self._handler = handler
        self.subs: list[Any] = []

    async def on_msg(self, msg: Msg) -> None:
        # A core message carries no JetStream metadata: no revision.
        await self._handler(self._state.entry(msg, 0))

    async def stop(self) -> None:
        subs, self.subs = self.subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
