"""Single-flight builds across every builder, through a JetStream KV bucket of build claims.

One key per derivation (its hash part). Whoever `create`s the key holds the lease and builds;
it renews the key with compare-and-set `update(last=revision)` every third of the TTL, and
finally replaces it with the result. The bucket's TTL (`max_age`) drops a key nobody renews:
a killed builder's lease expires and a redelivered event builds again. Everyone else waits:
it polls the key until it holds a result (which it reuses) or vanishes (then it checks the
cache and competes again). Results live for one TTL, long enough for every waiter to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pydantic import ValidationError

from niphas_common.bus.kv import BusError, KeyNotFound, KeyValue, RevisionMismatch
from niphas_common.errors import TransientError

from .metrics import LEASE_WAITS
from .result import BuildResult

log = logging.getLogger(__name__)

BUCKET = "niphas-builds"
POLL_S = 0.2
"""How often a waiter looks at the key: a KV read is cheap, a build takes seconds."""


@dataclass(frozen=True)
class _Record:
    state: str  # building | done
    holder: str
    result: BuildResult | None = None
    asker: str | None = None
    """Who the build was for (the eval.done's event id): its result is `built` for it alone."""

    def encode(self) -> bytes:
        body: dict[str, object] = {"state": self.state, "holder": self.holder, "at": time.time()}
        if self.result is not None:
            body["result"] = self.result.model_dump(mode="json")
        if self.asker is not None:
            body["asker"] = self.asker
        return json.dumps(body).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> _Record | None:
        try:
            body = json.loads(raw or b"")
            result = body.get("result")
            return cls(
                body["state"],
                body.get("holder", "?"),
                BuildResult.model_validate(result) if result else None,
                body.get("asker"),
            )
        except (ValueError, KeyError, TypeError, ValidationError):
            return None  # unreadable (another version?): treat as held and wait it out

    def result_for(self, asker: str) -> BuildResult | None:
        """The result as `asker` sees it: the same one it was built for (so a redelivered
        eval.done publishes the same build.done), `cached` for any other evaluation."""
        if self.result is None or self.asker == asker:
            return self.result
        return self.result.reused()


class SingleFlight:
    def __init__(self, kv: KeyValue, holder: str, ttl_s: float) -> None:
        self.kv = kv
        self.holder = holder
        self.ttl_s = ttl_s

    async def peek(self, key: str, asker: str) -> BuildResult | None:
        """The result recorded under `key` as `asker` sees it, if a build finished within the
        last TTL."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFound:
            return None
        except BusError as exc:
            raise TransientError(f"build lease store unavailable: {exc!r}") from exc
        record = _Record.decode(entry.value)
        return record.result_for(asker) if record is not None else None

    async def run(
        self,
        key: str,
        asker: str,
        build: Callable[[], Awaitable[BuildResult]],
        recheck: Callable[[], Awaitable[BuildResult | None]],
        *,
        timeout_s: float,
    ) -> BuildResult:
        """Run `build` for `asker` unless another builder is running it, then share its
        result (as `asker` sees it).

        `recheck` runs whenever a lease vanished without a result (the cache may have the
        paths by now). A `TransientError` from `build` releases the lease and propagates."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                revision = await self.kv.create(key, _Record("building", self.holder).encode())
            except RevisionMismatch:
                pass
            except BusError as exc:
                raise TransientError(f"build lease store unavailable: {exc!r}") from exc
            else:
                return await self._lead(key, asker, revision, build)
            LEASE_WAITS.inc()
            result = await self._wait(key, asker, deadline)
            if result is not None:
                return result
            if (cached := await recheck()) is not None:
                return cached

    async def _lead(
        self, key: str, asker: str, revision: int, build: Callable[[], Awaitable[BuildResult]]
    ) -> BuildResult:
        state = {"revision": revision}
        renewer = asyncio.create_task(self._renew(key, state))
        try:
            result = await build()
        except BaseException:
            renewer.cancel()
            with contextlib.suppress(Exception):
                await self.kv.delete(key, last=state["revision"])
            raise
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        try:
            await self.kv.update(
                key, _Record("done", self.holder, result, asker).encode(), last=state["revision"]
            )
        except RevisionMismatch:
            log.warning("lease on %s was lost during the build; result not shared", key)
        except BusError as exc:
            # The result is in the cache and goes out in build.done; waiters find it there.
            log.warning("could not record the result of %s: %r", key, exc)
        return result

    async def _renew(self, key: str, state: dict[str, int]) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                state["revision"] = await self.kv.update(
                    key, _Record("building", self.holder).encode(), last=state["revision"]
                )
            except RevisionMismatch:
                log.warning("lease on %s expired and was taken over; building on", key)
                return
            except BusError as exc:
                log.warning("could not renew lease on %s: %r", key, exc)

    async def _wait(self, key: str, asker: str, deadline: float) -> BuildResult | None:
        """Wait for the holder: its result, or None once the key is gone."""
        while time.monotonic() < deadline:
            try:
                entry = await self.kv.get(key)
            except KeyNotFound:  # deleted, purged or expired
                return None
            except BusError as exc:
                raise TransientError(f"build lease store unavailable: {exc!r}") from exc
            record = _Record.decode(entry.value)
            if record is not None and record.result is not None:
                return record.result_for(asker)
            await asyncio.sleep(POLL_S)
        raise TransientError(f"gave up waiting for the build holding {key}")
