"""The node's binary cache over HTTP: one aiohttp application, one module per endpoint.

    /nix-cache-info          serve_cache_info
    /<hash>.narinfo          serve_narinfo   (the node's store, then the cache directory)
    /nar/<hash>.nar[.zst]    serve_nar       (streamed from the store path)
    /nar/<file hash>.nar.*   serve_nar       (a file of the cache directory)
    /healthz /readyz /metrics

The node's own NARs are named by the store path's 32-character hash part; the builder's cache
names its NARs by the 52-character file hash, so the two never collide under /nar/.
"""

from __future__ import annotations

from aiohttp import web

from niphas_common.http import Readiness, add_ops_routes

from . import serve_cache_info, serve_nar, serve_narinfo
from .cache_view import HASH_RE, VIEW, CacheView


def build_app(view: CacheView, readiness: Readiness) -> web.Application:
    app = web.Application()
    app[VIEW] = view
    app.router.add_get("/nix-cache-info", serve_cache_info.handle)
    app.router.add_get(f"/{{hash:{HASH_RE}}}.narinfo", serve_narinfo.handle)
    app.router.add_get("/nar/{name}", serve_nar.handle)
    add_ops_routes(app, readiness)
    return app
