"""`/nix-cache-info`: the store dir, mass queries welcome, and the node's priority."""

from __future__ import annotations

from aiohttp import web

from .cache_view import VIEW


async def handle(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    text = f"StoreDir: {view.store.store_dir.path}\nWantMassQuery: 1\nPriority: {view.priority}\n"
    return web.Response(text=text, content_type="text/x-nix-cache-info")
