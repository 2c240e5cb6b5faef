"""Which (repository, commit) were evaluated, and to what: a JetStream key-value bucket shared
by workers.

A commit is evaluated once however many pushes name it (one pushed to `feature`, then
fast-forwarded onto `main`; a ref moved back to a commit it had before), and every push still
gets its own `eval.done`. Before evaluating, a worker *claims* the key with an atomic create
(`evaluating`); once JetStream stored the eval.done it marks the key `published` and keeps that
eval.done with it. A later push of the commit finds it there and publishes it again as its own
(its push, ref and push time). The eval.done fits the server's max_payload with 4 KiB to spare
(the worker's `_fitting`), room enough for the rest of the record. If publishing fails, the push
is redelivered and evaluated again, and the eval.done's Msg-Id stores it once.

A claim held by another push event is respected while it is fresh (that event's worker is
evaluating, and pushes of the same commit wait for its result; if it dies, its own event is
redelivered and takes the claim over); a claim older than `stale_after_s`, one held by the same
push event (a redelivery), or a `published` record without a usable eval.done (written by an
earlier version) is taken over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from niphas_common.bus.bus import Bus
from niphas_common.bus.kv import KeyNotFound, KeyValue, RevisionMismatch
from niphas_schemas import EvalDone

log = logging.getLogger(__name__)

State = Literal["evaluating", "published"]


def result_key(repository: str, commit: str) -> str:
    """A valid KV key for (repository, commit): `<sha256(repository)[:32]>.<commit>`."""
    return f"{hashlib.sha256(repository.encode()).hexdigest()[:32]}.{commit}"


@dataclass(frozen=True)
class Record:
    state: State
    push_event_id: str
    at: float
    worker: str
    result: EvalDone | None = None
    """The eval.done published (`published` only): what later pushes of the commit reuse."""

    def encode(self) -> bytes:
        body: dict[str, Any] = {**self.__dict__, "result": None}
        if self.result is not None:
            body["result"] = self.result.model_dump(mode="json")
        # Compact and unescaped, so the record is hardly larger than the eval.done itself.
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> Record | None:
        try:
            body = json.loads(data or b"")
            result = body.pop("result", None)
            record = cls(**body)
        except (ValueError, TypeError):
            return None
        try:
            done = EvalDone.model_validate(result) if result is not None else None
        except ValidationError:
            done = None  # another version's result: evaluated again
        return dataclasses.replace(record, result=done)

    @property
    def reusable(self) -> bool:
        return self.state == "published" and self.result is not None


@dataclass(frozen=True)
class Claim:
    outcome: Literal["mine", "busy", "published"]
    record: Record | None = None
    """The record found, or ours."""


class ResultStore:
    def __init__(self, kv: KeyValue, *, worker: str, stale_after_s: float) -> None:
        self._kv = kv
        self.worker = worker
        self.stale_after_s = stale_after_s

    @classmethod
    async def open(
        cls,
        bus: Bus,
        bucket: str,
        *,
        ttl_s: float,
        replicas: int,
        worker: str,
        stale_after_s: float,
    ) -> ResultStore:
        """Open the bucket, creating it the first time (idempotent)."""
        kv = await bus.key_value(
            bucket,
            ttl_s=ttl_s,
            description="niphas eval: (repository, commit) already evaluated",
            replicas=replicas,
        )
        return cls(kv, worker=worker, stale_after_s=stale_after_s)

    async def claim(self, key: str, push_event_id: str) -> Claim:
        mine = Record("evaluating", push_event_id, time.time(), self.worker)
        for _ in range(3):  # a lost race on update: read again and decide again
            try:
                await self._kv.create(key, mine.encode())
                return Claim("mine", mine)
            except RevisionMismatch:
                pass
            try:
                entry = await self._kv.get(key)
            except KeyNotFound:
                continue  # deleted or expired between the two calls
            found = Record.decode(entry.value)
            if found is not None and found.reusable:
                return Claim("published", found)
            if found is not None and found.state == "evaluating":
                fresh = time.time() - found.at < self.stale_after_s
                if fresh and found.push_event_id != push_event_id:
                    return Claim("busy", found)
            try:
                await self._kv.update(key, mine.encode(), last=entry.revision)
                return Claim("mine", mine)
            except RevisionMismatch:
                continue
        return Claim("busy", None)

    async def record(self, key: str, record: Record) -> None:
        await self._kv.put(key, record.encode())

    async def release(self, key: str) -> None:
        """Forget `key` (a claim whose commit could not be fetched): a later push tries."""
        await self._kv.delete(key)

    async def get(self, key: str) -> Record | None:
        try:
            entry = await self._kv.get(key)
        except KeyNotFound:
            return None
        return Record.decode(entry.value)
