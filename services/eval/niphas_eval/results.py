"""Which (repository, commit) were evaluated: a JetStream key-value bucket shared by workers.

`eval.done`'s Msg-Id (repository + commit + status) already makes a re-published result a
duplicate inside the stream's duplicate window. This bucket makes the guarantee outlive the
window and covers evaluation itself: before evaluating, a worker *claims* the key with an
atomic create (`evaluating`), and marks it `published` once JetStream stored the eval.done.
The result itself is not kept here (it can be 1 MB): if publishing fails, the push is
redelivered and evaluated again, and the eval.done's Msg-Id stores it once.

A claim held by another push event is respected while it is fresh (that event's worker is
evaluating; if it dies, its own event is redelivered and takes the claim over); a claim older
than `stale_after_s`, or held by the same push event (a redelivery), is taken over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Literal

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

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

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> Record | None:
        try:
            return cls(**json.loads(data or b""))
        except (ValueError, TypeError):
            return None


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
        js: JetStreamContext,
        bucket: str,
        *,
        ttl_s: float,
        replicas: int,
        worker: str,
        stale_after_s: float,
    ) -> ResultStore:
        """Open the bucket, creating it the first time (idempotent)."""
        try:
            kv = await js.key_value(bucket)
        except BucketNotFoundError:
            kv = await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    description="niphas eval: (repository, commit) already evaluated",
                    history=1,
                    ttl=ttl_s,
                    storage=StorageType.FILE,
                    replicas=replicas,
                )
            )
            log.info("created key-value bucket %s", bucket)
        return cls(kv, worker=worker, stale_after_s=stale_after_s)

    async def claim(self, key: str, push_event_id: str) -> Claim:
        mine = Record("evaluating", push_event_id, time.time(), self.worker)
        for _ in range(3):  # a lost race on update: read again and decide again
            try:
                await self._kv.create(key, mine.encode())
                return Claim("mine", mine)
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:
                continue  # deleted or expired between the two calls
            found = Record.decode(entry.value)
            if found is not None and found.state == "published":
                return Claim("published", found)
            fresh = found is not None and time.time() - found.at < self.stale_after_s
            if found is not None and fresh and found.push_event_id != push_event_id:
                return Claim("busy", found)
            try:
                await self._kv.update(key, mine.encode(), last=entry.revision)
                return Claim("mine", mine)
            except KeyWrongLastSequenceError:
                continue
        return Claim("busy", None)

    async def record(self, key: str, record: Record) -> None:
        await self._kv.put(key, record.encode())

    async def get(self, key: str) -> Record | None:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        return Record.decode(entry.value)
