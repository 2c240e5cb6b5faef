"""How many peers this node uploads NARs to at once: one more peer waits or asks another.

Every peer a node sends to shares its uplink and its CPU share with the others; past a few at
once each one slows (a node under a tight CPU quota stalls them all), while other nodes that
hold the path sit idle. So a node uploads to at most `limit` peers at a time (any number of
NARs to each: one peer's downloads share its downlink anyway, and a closure's paths are asked
for together); a request from one more peer gets `503 Service Unavailable` with `Retry-After`,
and that peer's fetcher tries another holder or asks again shortly (`peer_load`) rather than
go to the cache. A peer is known by the node name its fetcher sends (`PEER_HEADER`), else by
its address.

Only the mesh's own fetchers are turned away: a Nix client (its User-Agent names `Nix/`, as
when the node serves as a binary cache to the pods on it) is always served, and so are HEAD
requests and narinfos. The limit is NIPHAS_MESH_UPLOAD_SLOTS (default 2; 0: no limit).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator

from aiohttp import hdrs, web

DEFAULT_LIMIT = 2
"""Peers uploaded to at once, unless NIPHAS_MESH_UPLOAD_SLOTS says otherwise."""
PEER_HEADER = "X-Niphas-Node"
"""The request header in which a mesh fetcher names its node."""
RETRY_AFTER_S = 1
"""What a turned-away peer is told to wait (whole seconds, as HTTP has it)."""


def configured_limit() -> int:
    """NIPHAS_MESH_UPLOAD_SLOTS, or the default; a clear error for anything but a count."""
    raw = os.environ.get("NIPHAS_MESH_UPLOAD_SLOTS", "").strip()
    if not raw:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        raise ValueError(f"NIPHAS_MESH_UPLOAD_SLOTS={raw!r}: not a whole number") from None
    if limit < 0:
        raise ValueError(f"NIPHAS_MESH_UPLOAD_SLOTS={raw!r}: must be 0 (no limit) or more")
    return limit


class UploadSlots:
    def __init__(self, limit: int | None = None) -> None:
        self.limit = configured_limit() if limit is None else limit
        """Peers uploaded to at once (0: no limit); tests may change it on a live node."""
        self.peers: Counter[str] = Counter()
        """Peer -> NARs being uploaded to it right now."""
        self.refused = 0
        """Requests turned away so far (for tests and metrics)."""

    @contextlib.contextmanager
    def slot(self, request: web.BaseRequest) -> Iterator[None]:
        """Count a NAR GET from a peer while it is answered; 503 when it would be one peer too
        many."""
        if request.method != hdrs.METH_GET or "Nix/" in request.headers.get(hdrs.USER_AGENT, ""):
            yield
            return
        peer = request.headers.get(PEER_HEADER) or request.remote or "?"
        if self.limit and peer not in self.peers and len(self.peers) >= self.limit:
            self.refused += 1
            raise web.HTTPServiceUnavailable(
                headers={hdrs.RETRY_AFTER: str(RETRY_AFTER_S)},
                text=f"uploading to {len(self.peers)} peers already; ask another holder\n",
            )
        self.peers[peer] += 1
        try:
            yield
        finally:
            self.peers[peer] -= 1
            if not self.peers[peer]:
                del self.peers[peer]
