"""Which store path each owned Deployment runs, as the Deployment watch and the reconciler's
own applies last showed it: what a reconcile asks before it applies a Deployment (does this
apply move it to another store path, so nodes are preheated and the move announced?) answered
without a GET of an object the watch already delivered.

Only answers once the watch's first list is complete (before that, or for a retried
reconcile, the reconciler reads the Deployment itself). A copy older than the one held is
ignored: the store path is in the spec, whose `metadata.generation` only grows while the
object (its uid) lives. Every change not made by the reconciler reaches it through the watch
and queues the workload again, so a copy that lags is corrected by the next reconcile; what a
lag can cost is a repeated preheat (and an Event deduplicated by name), or a Deployment
someone else edited in that moment put back without being announced as a move.
"""

from __future__ import annotations

import enum
from typing import Any, Final, Literal

from niphas_common.kube.watch import LISTED, SYNCED, WatchEvent
from niphas_operator.children import store_path_of
from niphas_operator.store import Key


class _Unknown(enum.Enum):
    UNKNOWN = "unknown"


UNKNOWN: Final = _Unknown.UNKNOWN
"""The cache cannot tell (the watch has not listed yet): read the Deployment."""

_Entry = tuple[str, int, str | None]
"""(uid, generation, store path) of one Deployment."""


class DeploymentCache:
    def __init__(self) -> None:
        self._entries: dict[Key, _Entry] = {}
        self._listing: dict[Key, _Entry] | None = None
        self._synced = False

    def observe(self, event: WatchEvent) -> None:
        """One event of the Deployment list + watch (LISTED ... SYNCED, then changes)."""
        if event.kind == SYNCED:
            self._entries, self._listing = self._listing or {}, None
            self._synced = True
            return
        key, entry = _entry(event.obj)
        if event.kind == LISTED:
            if self._listing is None:
                # A relist: the watch broke, and what it missed is only known once the list
                # is complete.
                self._listing, self._synced = {}, False
            self._listing[key] = entry
        elif event.kind == "DELETED":
            if self._entries.get(key, entry)[0] == entry[0]:
                self._entries.pop(key, None)
        else:
            self._put(key, entry)

    def reset(self) -> None:
        """Know nothing until the next complete list (a new watch, as when leadership
        returns: what happened meanwhile was not watched)."""
        self._entries, self._listing, self._synced = {}, None, False

    def applied(self, obj: dict[str, Any]) -> None:
        """A Deployment as an apply answered: newer than anything the watch delivered yet."""
        self._put(*_entry(obj))

    def forget(self, key: Key) -> None:
        """Deployment `key` was deleted (its watch event may not have arrived yet)."""
        self._entries.pop(key, None)

    def store_path(self, key: Key) -> str | Literal[_Unknown.UNKNOWN] | None:
        """The store path Deployment `key` runs, None when there is no such Deployment, or
        UNKNOWN before the watch's first complete list."""
        if not self._synced:
            return UNKNOWN
        entry = self._entries.get(key)
        return None if entry is None else entry[2]

    def _put(self, key: Key, entry: _Entry) -> None:
        held = self._entries.get(key)
        if held is not None and held[0] == entry[0] and held[1] > entry[1]:
            return  # an older copy of the same object
        self._entries[key] = entry


def _entry(obj: dict[str, Any]) -> tuple[Key, _Entry]:
    meta = obj.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    return key, (str(meta.get("uid", "")), int(meta.get("generation") or 0), store_path_of(obj))
