"""What this node knows of its holders' load: its own downloads from each, and who said busy.

A holder that answers a NAR request with 503 (`upload_slots`: it is uploading all it takes at
once) is busy for the seconds it asks (`Retry-After`; here a fixed `BUSY_S`); `HolderChoice`
tries the others first and, when every peer that could serve is busy, waits for one rather
than going to the cache. Among the others it prefers the holders this node downloads the least
from right now, in random order among equals, so one seed does not serve everyone.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .index import Holding

BUSY_S = 0.5
"""Seconds a holder that answered 503 is left alone (`upload_slots` asks for a whole second, HTTP's
least; an upload of one path is often over sooner)."""


class PeerLoad:
    def __init__(self) -> None:
        self.downloading: Counter[str] = Counter()
        """URL -> this node's NAR downloads from it right now."""
        self._busy_until: dict[str, float] = {}

    @contextmanager
    def download(self, url: str) -> Iterator[None]:
        self.downloading[url] += 1
        try:
            yield
        finally:
            self.downloading[url] -= 1
            if not self.downloading[url]:
                del self.downloading[url]

    def busy(self, url: str, seconds: float = BUSY_S) -> None:
        """The holder at `url` turned a download away: leave it alone that long."""
        self._busy_until[url] = asyncio.get_running_loop().time() + seconds

    def is_busy(self, url: str) -> bool:
        until = self._busy_until.get(url)
        if until is None:
            return False
        if until <= asyncio.get_running_loop().time():
            del self._busy_until[url]
            return False
        return True

    def free_in(self, holders: Sequence[Holding]) -> float:
        """Seconds until the first of `holders` that is busy is not (0 if one is free)."""
        now = asyncio.get_running_loop().time()
        return max(0.0, min((self._busy_until.get(h.url, now) - now for h in holders), default=0))

    def order(self, holders: Sequence[Holding]) -> list[Holding]:
        """Peers first: free before busy, the fewest downloads of ours first, shuffled among
        equals; the caches after them, in their order."""
        peers = [h for h in holders if h.kind == "node"]
        random.shuffle(peers)
        peers.sort(key=lambda h: (self.is_busy(h.url), self.downloading[h.url]))
        return peers + [h for h in holders if h.kind != "node"]
