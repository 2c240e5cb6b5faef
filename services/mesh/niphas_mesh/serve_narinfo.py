"""`/<hash>.narinfo`: the narinfo of a path this node holds, with the builder's signatures.

Only paths carrying a valid signature by a trusted key are served: the mesh never signs, so a
path built on this node without the builder's signature would be refused by every peer and by
Nix clients that require signatures; it gets a 404 instead and the client moves on to the next
substituter. A path the node is fetching right now is served as soon as its narinfo is verified
(see `inflight`). When the node lacks the path, the cache directory's narinfo (if any) is
served, so `http://<node>/` also works as the cache in the embedded default.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from aiohttp import web

from .cache_view import CacheView

NARINFO_TYPE = "text/x-nix-narinfo"


async def handle(view: CacheView, hash_part: str) -> web.Response:
    info = await view.store.find(hash_part)
    if info is not None and view.store.is_signed(info):
        body = view.store.narinfo_text(info, view.compression)
        return web.Response(body=body, content_type=NARINFO_TYPE)
    partial = view.inflight.get(hash_part)
    if partial is not None:
        # Being fetched: its verified narinfo (the builder's signature), pointing at our NAR.
        end = asyncio.get_running_loop().time() + view.partial_wait_s
        while partial.info is None and (left := end - asyncio.get_running_loop().time()) > 0:
            await partial.changed(left)
        if partial.info is not None:
            local = replace(
                partial.info,
                url=f"nar/{hash_part}.nar",
                compression="none",
                file_hash=None,
                file_size=None,
            )
            body = local.render().encode()
            return web.Response(body=body, content_type=NARINFO_TYPE)
    if view.cache_dir is not None:
        file = view.cache_dir / f"{hash_part}.narinfo"
        try:
            body = await asyncio.to_thread(file.read_bytes)
        except OSError:
            pass
        else:
            return web.Response(body=body, content_type=NARINFO_TYPE)
    raise web.HTTPNotFound(text="no such path\n")
