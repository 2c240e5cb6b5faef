"""What a service needs before it can work, reported instead of crashed on.

A Secret that is not there yet (a webhook secrets file, the cache's signing key, the NATS
password) must not make a pod crash-loop with a traceback nobody reads. The service starts,
registers each thing it needs as a `Requirement`, and `Requirements` reports the first one
missing as the reason of /readyz (503) and in the log: one ERROR when it goes missing (at
start, or later), the same line again every `relog_s` while it stays missing (never a line per
probe), and one INFO line when it appears. A Secret mounted as a volume updates in place, so
file requirements are re-checked on every probe and by `wait`; an environment variable does
not (the message says to restart the pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

RELOG_S = 300.0
"""Seconds between repeats of the ERROR line of a requirement that stays missing."""
POLL_S = 5.0
"""Seconds between checks while `wait` waits for requirements to be met."""


@dataclass
class Requirement:
    """One thing the service needs; `missing()` says why it is not there, or None."""

    name: str
    missing: Callable[[], str | None]
    _reason: str | None = field(default=None, init=False)
    _logged_at: float | None = field(default=None, init=False)


def file_missing(path: Path, what: str) -> Callable[[], str | None]:
    """A check that `path` exists, is readable and not empty; `what` names where it comes
    from (e.g. "the Secret niphas-cache-key, key secret-key")."""

    def check() -> str | None:
        try:
            if path.read_bytes().strip():
                return None
        except FileNotFoundError:
            return f"{path} is missing: create {what}"
        except OSError as exc:
            return f"{path} is not readable ({exc.strerror}): {what}"
        return f"{path} is empty: fill {what}"

    return check


class Requirements:
    """The requirements of one service process, checked and logged together."""

    def __init__(
        self,
        service: str,
        *,
        relog_s: float = RELOG_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.relog_s = relog_s
        self._clock = clock
        self._items: list[Requirement] = []

    def add(self, name: str, missing: Callable[[], str | None]) -> None:
        """Register a requirement and check it at once (a missing one is logged now)."""
        item = Requirement(name, missing)
        self._items.append(item)
        self._check(item)

    def file(self, path: Path, what: str) -> None:
        self.add(str(path), file_missing(path, what))

    def setting(self, name: str, present: bool, hint: str) -> None:
        """A setting read once at start (an environment variable): missing for good until
        the process restarts."""
        reason = None if present else f"{name} is empty: {hint}"
        self.add(name, lambda: reason)

    def _check(self, item: Requirement) -> str | None:
        reason = item.missing()
        now = self._clock()
        if reason is None:
            if item._reason is not None:
                log.info("%s: %s is there now", self.service, item.name)
            item._reason, item._logged_at = None, None
            return None
        changed = reason != item._reason
        due = item._logged_at is None or now - item._logged_at >= self.relog_s
        if changed or due:
            log.error("%s: not ready: %s", self.service, reason)
            item._logged_at = now
        item._reason = reason
        return reason

    def check(self) -> str | None:
        """None when every requirement is met, else the first reason (all are re-checked,
        so each missing one is logged)."""
        first: str | None = None
        for item in self._items:
            reason = self._check(item)
            first = first or reason
        return first

    async def readiness(self) -> str | None:
        return self.check()

    async def wait(self, stop: asyncio.Event, poll_s: float = POLL_S) -> bool:
        """Until every requirement is met (True) or `stop` is set (False)."""
        while self.check() is not None:
            if stop.is_set():
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)
        return True
