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
requests and narinfos. The limit is the setting NIPHAS_MESH_UPLOAD_SLOTS (0: no limit).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from aiohttp import hdrs, web

DEFAULT_LIMIT = 2
"""Peers uploaded to at once where no setting is given (the setting's default too)."""
PEER_HEADER = "X-Niphas-Node"
"""The request header in which a mesh fetcher names its node."""
RETRY_AFTER_S = 1
"""What a turned-away peer is told to wait (whole seconds, as HTTP has it)."""


class UploadSlots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
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
