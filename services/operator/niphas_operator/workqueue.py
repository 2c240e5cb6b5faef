"""A work queue of object keys: deduplicated, one worker per key at a time, retries with
per-key exponential backoff.

The semantics of client-go's workqueue, which level-triggered controllers rely on: adding a
key that is already waiting does nothing; adding a key that is being processed marks it
dirty, and it is queued again once the worker is done, so no change is lost and no object is
reconciled by two workers at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self, *, retry_base_s: float, retry_max_s: float) -> None:
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._waiting: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()
        self._failures: dict[K, int] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s

    def add(self, key: K) -> None:
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._waiting:
            return
        self._waiting.add(key)
        self._queue.put_nowait(key)

    async def get(self) -> K:
        """The next key; the caller must call `done(key)` when finished with it."""
        key = await self._queue.get()
        self._waiting.discard(key)
        self._processing.add(key)
        return key

    def processing(self, key: K) -> bool:
        return key in self._processing

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def retry(self, key: K, first_s: float | None = None) -> float:
        """Queue `key` again after its backoff (from `first_s`, else the queue's base, doubled
        per failure in a row); returns the delay in seconds."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        base = self._retry_base_s if first_s is None else first_s
        delay: float = min(base * 2.0**failures, self._retry_max_s)
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay, self._fire, key)
        return delay

    def failures(self, key: K) -> int:
        """How many times in a row `key` failed."""
        return self._failures.get(key, 0)

    def forget(self, key: K) -> None:
        """The key succeeded: its next failure starts from the base delay again."""
        self._failures.pop(key, None)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def __len__(self) -> int:
        return len(self._waiting) + len(self._dirty)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
