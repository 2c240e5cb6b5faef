"""Posting statuses to forges without ever holding up the pipeline.

`submit` only queues (one queue and one worker per forge API, so a forge that is down delays
only its own statuses, in order); the event that caused the status is acked at once. Each
request is tried up to `attempts` times with doubling backoff while the forge is unreachable
or answers 5xx or 429; a 4xx is the forge's final word (wrong token, unknown commit) and is
logged once. A status that ran out of tries, or found its queue full, is dropped and counted
(`niphas_reporter_statuses_total{outcome="dropped"}`).

A pending status never follows a final one of the same commit and context: the reporter's
three consumers run independently, so a build.done may be handled before the eval.done that
set its attribute pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import aiohttp

from niphas_common.repo_credentials import CredentialsFile

from .forges import CommitStatus, ForgeError, ForgeKind, Request, api_base, forge_of, request
from .metrics import POST_SECONDS, RETRIES, STATUSES

log = logging.getLogger(__name__)

REMEMBERED = 50_000
"""(commit, context) pairs whose final state is remembered, to refuse a late pending."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number `attempt` (1-based)."""
        return float(min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s))


class _Retry(Exception):
    """The forge may answer later (unreachable, 5xx, 429)."""


class StatusPoster:
    def __init__(
        self,
        credentials: CredentialsFile,
        policy: RetryPolicy,
        *,
        timeout_s: float = 10.0,
        queue_size: int = 10000,
    ) -> None:
        self.credentials = credentials
        self.policy = policy
        self.timeout_s = timeout_s
        self.queue_size = queue_size
        self._queues: dict[str, asyncio.Queue[tuple[ForgeKind, Request]]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._final: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._forges: dict[str, str] = {}
        self._session: aiohttp.ClientSession | None = None

    def learn_forge(self, repository: str, forge: str) -> None:
        """The forge a webhook of `repository` came from (used when its entry names none)."""
        if forge != "niphas":
            self._forges[repository] = forge

    def submit(self, status: CommitStatus) -> None:
        """Queue `status` for its forge; never waits."""
        key = (status.repository, status.commit, status.context)
        if status.state in ("pending", "running"):
            if key in self._final:
                return
        else:
            self._final[key] = None
            self._final.move_to_end(key)
            while len(self._final) > REMEMBERED:
                self._final.popitem(last=False)
        credential = self.credentials.for_url(status.repository)
        if credential is None:
            log.debug("no credentials for %s: no status", status.repository)
            STATUSES.labels("unknown", "skipped").inc()
            return
        try:
            kind = forge_of(credential, status.repository, self._forges.get(status.repository))
            token = credential.read_token()
            if token is None:
                raise ForgeError(f"{status.repository}: its credentials entry has no token")
            built = request(kind, credential, token, status)
            base = api_base(kind, credential, status.repository)
        except (ForgeError, OSError) as exc:
            log.warning("no status for %s: %s", status.repository, exc)
            STATUSES.labels("unknown", "skipped").inc()
            return
        queue = self._queues.get(base)
        if queue is None:
            queue = self._queues[base] = asyncio.Queue(self.queue_size)
            self._workers.append(asyncio.create_task(self._work(queue), name=f"forge {base}"))
        try:
            queue.put_nowait((kind, built))
        except asyncio.QueueFull:
            log.warning("status queue of %s full: %s dropped", base, status.context)
            STATUSES.labels(kind, "dropped").inc()

    async def idle(self) -> None:
        """Wait until every queued status was posted or given up."""
        for queue in list(self._queues.values()):
            await queue.join()

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        if self._session is not None:
            await self._session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def _work(self, queue: asyncio.Queue[tuple[ForgeKind, Request]]) -> None:
        while True:
            kind, built = await queue.get()
            try:
                await self._post(kind, built)
            except Exception:
                log.exception("posting %r failed", built)
            finally:
                queue.task_done()

    async def _post(self, kind: ForgeKind, built: Request) -> None:
        for attempt in range(1, self.policy.attempts + 1):
            try:
                await self._once(kind, built)
            except _Retry as exc:
                if attempt == self.policy.attempts:
                    log.warning("%r: gave up after %d tries (%s)", built, attempt, exc)
                    STATUSES.labels(kind, "dropped").inc()
                    return
                RETRIES.labels(kind).inc()
                await asyncio.sleep(self.policy.delay(attempt))
            else:
                return

    async def _once(self, kind: ForgeKind, built: Request) -> None:
        started = time.monotonic()
        try:
            async with self._client().request(
                built.method, built.url, headers=built.headers, json=built.body
            ) as response:
                text = (await response.text())[:200]
                code = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retry(exc.__class__.__name__) from None
        finally:
            POST_SECONDS.labels(kind).observe(time.monotonic() - started)
        if code >= 500 or code == 429:
            raise _Retry(f"HTTP {code}")
        if code >= 400:
            log.error("%r refused: HTTP %d %s", built, code, text)
            STATUSES.labels(kind, "refused").inc()
            return
        STATUSES.labels(kind, "posted").inc()
