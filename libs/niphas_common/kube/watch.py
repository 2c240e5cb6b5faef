"""List + watch of one collection, as a stream of events, kept apart from whatever the
caller does per object (the operator's work queue, the builder's wait for one Job).

The collection is listed first (each item as LISTED, then one SYNCED: the caller's view is
complete), then watched from the list's resourceVersion. A watch the server closes resumes
from the last version seen, bookmarks included (they move the version, and are not passed
on); a 410 Gone (that version was compacted away) relists; every `resync_s` a full relist
runs anyway, so a consumer that re-queues what it lists repairs anything a missed event
would have changed. Other API errors are retried with exponential backoff, or raised when
the caller gives no `retry`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

from niphas_common.kube.client import Gone, Kube, KubeError

log = logging.getLogger(__name__)

LISTED: Final = "LISTED"
SYNCED: Final = "SYNCED"
WATCH_TIMEOUT_S: Final = 240
"""Seconds one watch request lasts before it is renewed (servers cap watches anyway)."""


@dataclass(frozen=True)
class WatchEvent:
    kind: str
    """LISTED, SYNCED (after each list; no object), or the watch's ADDED/MODIFIED/DELETED."""
    obj: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Backoff:
    base_s: float
    max_s: float

    def delay(self, failures: int) -> float:
        """Seconds before attempt `failures + 1`: the base doubled per failure, capped."""
        return min(self.base_s * 2.0**failures, self.max_s)


@dataclass(frozen=True)
class Selection:
    """Which objects of the collection at `path`."""

    path: str
    label_selector: str | None = None
    field_selector: str | None = None


async def list_and_watch(
    kube: Kube, selection: Selection, *, resync_s: float, retry: Backoff | None
) -> AsyncIterator[WatchEvent]:
    """Events of the selected objects, forever (see the module's docstring)."""
    failures = 0
    while True:
        try:
            items, version = await kube.list(
                selection.path,
                label_selector=selection.label_selector,
                field_selector=selection.field_selector,
            )
            for obj in items:
                yield WatchEvent(LISTED, obj)
            yield WatchEvent(SYNCED)
            listed = time.monotonic()
            while time.monotonic() - listed < resync_s:
                timeout_s = min(WATCH_TIMEOUT_S, int(resync_s) + 1)
                async for kind, obj in _watch(kube, selection, version, timeout_s):
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if kind != "BOOKMARK":
                        yield WatchEvent(kind, obj)
                failures = 0
        except Gone:
            log.info("watch %s: resourceVersion expired, relisting", selection.path)
        except KubeError as exc:
            if retry is None:
                raise
            failures += 1
            delay = retry.delay(failures)
            log.warning("watch %s failed (%s); relist in %.1fs", selection.path, exc, delay)
            await asyncio.sleep(delay)


def _watch(
    kube: Kube, selection: Selection, version: str, timeout_s: int
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    return kube.watch(
        selection.path,
        version,
        timeout_s=timeout_s,
        label_selector=selection.label_selector,
        field_selector=selection.field_selector,
    )
