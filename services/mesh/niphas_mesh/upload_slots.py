"""How many NARs this node uploads to its peers at once: a peer asking beyond that waits.

Every NAR a node sends to a peer shares its uplink and its CPU share with the others it is
sending; past a few at once each one slows (a node under a tight CPU quota stalls them all),
while other peers that hold the path sit idle. So a node takes at most `limit` NAR uploads to
peers at a time; a peer asking for one more gets `503 Service Unavailable` with `Retry-After`,
and its fetcher tries another holder or asks again shortly (`peer_load`), rather than the cache.

Only the mesh's own fetchers are turned away: a Nix client (its User-Agent names `Nix/`, as
when the node serves as a binary cache to the pods on it) is always served, and so are HEAD
requests and narinfos. The limit is NIPHAS_MESH_UPLOAD_SLOTS (default 4; 0: no limit).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from aiohttp import hdrs, web

DEFAULT_LIMIT = 4
"""NAR uploads to peers at once, unless NIPHAS_MESH_UPLOAD_SLOTS says otherwise."""
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
        """NAR uploads to peers at once (0: no limit); tests may change it on a live node."""
        self.taken = 0
        self.refused = 0
        """Requests turned away so far (for tests and the README's figures)."""

    @contextlib.contextmanager
    def slot(self, request: web.BaseRequest) -> Iterator[None]:
        """Hold one upload slot while a NAR GET from a peer is answered; 503 when full."""
        if request.method != hdrs.METH_GET or "Nix/" in request.headers.get(hdrs.USER_AGENT, ""):
            yield
            return
        if self.limit and self.taken >= self.limit:
            self.refused += 1
            raise web.HTTPServiceUnavailable(
                headers={hdrs.RETRY_AFTER: str(RETRY_AFTER_S)},
                text=f"uploading {self.taken} NARs already; ask another holder\n",
            )
        self.taken += 1
        try:
            yield
        finally:
            self.taken -= 1
