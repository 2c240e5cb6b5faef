"""Which commit is the newest of each (repository, ref), so older queued builds can be dropped.

A JetStream KV bucket maps a digest of (repository, ref) to the newest commit seen and when it
was pushed: the eval.done's `pushed_at`, or its `occurred_at` when it carries none (an eval
worker from before push times). Push time, not evaluation time: evaluations finish in any order,
and a commit evaluated long ago answers a new push of it (a fast-forward, a revert by push) at
once. Updated with compare-and-set, so two builders learning of two commits at once keep the
newer one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime

from niphas_common.bus.kv import BusError, KeyNotFound, KeyValue, RevisionMismatch
from niphas_schemas import EvalDone

log = logging.getLogger(__name__)

BUCKET = "niphas-ref-heads"
TTL_S = 7 * 86400.0
"""A ref silent for a week forgets its head; nothing older is queued by then."""


def _key(repository: str, ref: str) -> str:
    return hashlib.sha256(f"{repository}\x00{ref}".encode()).hexdigest()[:40]


def drv_hashes(event: EvalDone) -> list[str]:
    return sorted(
        {a.drv_path.rsplit("/", 1)[-1].split("-", 1)[0] for a in event.attributes if a.drv_path}
    )


@dataclass(frozen=True)
class Head:
    """The newest commit of a ref and its derivations (None: recorded by an older builder)."""

    commit: str
    drvs: frozenset[str] | None


def pushed(event: EvalDone) -> datetime:
    """When `event`'s commit became its ref's head, as well as the event tells."""
    return event.pushed_at or event.occurred_at


class RefHeads:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def _read(self, key: str) -> tuple[str, datetime, int, Head] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFound:
            return None
        try:
            body = json.loads(entry.value or b"")
            drvs = body.get("drvs")
            head = Head(body["commit"], None if drvs is None else frozenset(drvs))
            return body["commit"], datetime.fromisoformat(body["at"]), entry.revision or 0, head
        except (ValueError, KeyError, TypeError):
            return None

    async def record(self, event: EvalDone) -> None:
        """Remember `event`'s commit as its ref's head unless a newer one is known."""
        if event.ref is None:
            return
        key = _key(event.repository, event.ref)
        at = pushed(event)
        body = json.dumps(
            {"commit": event.commit, "at": at.isoformat(), "drvs": drv_hashes(event)}
        ).encode()
        try:
            for _ in range(5):
                current = await self._read(key)
                if current is not None and current[1] >= at:
                    return
                try:
                    if current is None:
                        await self.kv.create(key, body)
                    else:
                        await self.kv.update(key, body, last=current[2])
                    return
                except RevisionMismatch:
                    continue  # someone else wrote meanwhile: look again
        except BusError as exc:
            log.warning("could not record the head of %s: %r", event.ref, exc)

    async def superseded_by(self, event: EvalDone) -> str | None:
        """The newer commit of `event`'s ref, if one was pushed after `event`'s."""
        head = await self.superseding(event)
        return None if head is None else head.commit

    async def superseding(self, event: EvalDone) -> Head | None:
        """The head of `event`'s ref, if it was pushed after `event`'s commit."""
        if event.ref is None:
            return None
        try:
            current = await self._read(_key(event.repository, event.ref))
        except BusError as exc:
            log.warning("could not read the head of %s: %r", event.ref, exc)
            return None
        if current is None or current[0] == event.commit or current[1] <= pushed(event):
            return None
        return current[3]
