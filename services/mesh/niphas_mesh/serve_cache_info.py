"""`/nix-cache-info`: the store dir, mass queries welcome, and the node's priority."""

from __future__ import annotations

from aiohttp import web

from .cache_view import CacheView


def handle(view: CacheView) -> web.Response:
    text = f"StoreDir: {view.store.store_dir.path}\nWantMassQuery: 1\nPriority: {view.priority}\n"
    return web.Response(text=text, content_type="text/x-nix-cache-info")
