"""The node's binary cache over HTTP: aiohttp's low-level server, one module per endpoint.

    /nix-cache-info          serve_cache_info
    /<hash>.narinfo          serve_narinfo   (the node's store, then the cache directory)
    /nar/<hash>.nar[.zst]    serve_nar       (streamed from the store path)
    /nar/<file hash>.nar.*   serve_nar       (a file of the cache directory)
    /healthz /readyz /metrics

The node's own NARs are named by the store path's 32-character hash part; the builder's cache
names its NARs by the 52-character file hash, so the two never collide under /nar/.

A closure's lookups arrive by the hundred (`nix path-info`, `nix copy`: 25 connections at
once), so each request goes straight to its endpoint by its path: aiohttp's application layer
(router, match info, middleware chain) cost ~15% of a narinfo request's CPU time
(bench/bench_mesh.py measures the agent against a bare aiohttp server and nginx).
"""

from __future__ import annotations

import re

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from niphas_common.http import Readiness

from . import serve_cache_info, serve_nar, serve_narinfo
from .cache_view import HASH_RE, CacheView

_NARINFO_RE = re.compile(rf"/({HASH_RE})\.narinfo")
_NAR_PREFIX = "/nar/"


class CacheServer:
    """The request handler of the node's binary cache: the endpoint named by the path."""

    def __init__(self, view: CacheView, readiness: Readiness) -> None:
        self.view, self.readiness = view, readiness

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD):
            raise web.HTTPMethodNotAllowed(request.method, [hdrs.METH_GET, hdrs.METH_HEAD])
        path = request.path
        if (narinfo := _NARINFO_RE.fullmatch(path)) is not None:
            return await serve_narinfo.handle(self.view, narinfo.group(1))
        if path.startswith(_NAR_PREFIX) and "/" not in (name := path[len(_NAR_PREFIX) :]):
            with self.view.inflight.uploads.slot(request):  # 503 to peers when full
                return await serve_nar.handle(request, self.view, name)
        if path == "/nix-cache-info":
            return serve_cache_info.handle(self.view)
        return await self._ops(path)

    async def _ops(self, path: str) -> web.Response:
        """/healthz, /readyz and /metrics, as `niphas_common.http.add_ops_routes` serves them
        on the other services' aiohttp applications."""
        if path == "/healthz":
            return web.Response(text="ok\n")
        if path == "/readyz":
            reason = await self.readiness()
            if reason is None:
                return web.Response(text="ready\n")
            return web.Response(status=503, text=f"not ready: {reason}\n")
        if path == "/metrics":
            return web.Response(
                body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )
        raise web.HTTPNotFound(text="not found\n")


def build_server(view: CacheView, readiness: Readiness) -> web.Server:
    return web.Server(CacheServer(view, readiness), access_log=None)
