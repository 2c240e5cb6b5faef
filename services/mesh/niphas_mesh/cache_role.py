"""`NIPHAS_MESH_ROLE=cache`: the cluster's binary cache, one directory served over HTTP.

    GET/HEAD /nix-cache-info            fixed: StoreDir, WantMassQuery, Priority
    GET/HEAD /<hash>.narinfo            the file, as uploaded
    GET/HEAD /nar/<filehash>.nar[.zst]  the file, by sendfile (Range too), never recompressed
    PUT      /<hash>.narinfo, /nar/...  uploads by `nix copy --to http://...` (cache_upload)
    /healthz /readyz /metrics

No store, no NATS, no `nix`: the builder announces what it pushed (path.available, holder kind
`cache`), and every reader verifies the builder's signature and the NAR hash itself. Reads need
no credentials (NetworkPolicies decide who reaches the cache); writes need the upload token.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiohttp import web

from niphas_common.http import add_ops_routes, serve_ops
from niphas_common.nix.signing import TrustedKeys
from niphas_schemas.types import STORE_DIR

from . import cache_upload
from .cache_files import CacheFiles
from .cache_upload import ROLE, CacheRole
from .cache_view import HASH_RE
from .metrics import SERVED_BYTES
from .serve_narinfo import NARINFO_TYPE
from .settings import MeshSettings

log = logging.getLogger(__name__)


async def nix_cache_info(request: web.Request) -> web.Response:
    priority = request.app[ROLE].priority
    text = f"StoreDir: {STORE_DIR}\nWantMassQuery: 1\nPriority: {priority}\n"
    return web.Response(text=text, content_type="text/x-nix-cache-info")


async def narinfo(request: web.Request) -> web.Response:
    file = request.app[ROLE].files.narinfo_file(request.match_info["hash"])
    try:
        body = await asyncio.to_thread(file.read_bytes)
    except OSError:
        raise web.HTTPNotFound(text="no such path\n") from None
    return web.Response(body=body, content_type=NARINFO_TYPE)


async def nar(request: web.Request) -> web.StreamResponse:
    role = request.app[ROLE]
    file = role.files.nar_file(request.match_info["name"])
    if file is None or not file.is_file():
        raise web.HTTPNotFound(text="no such NAR\n")
    if request.method == "GET":
        SERVED_BYTES.labels(role.node, "cache").inc(file.stat().st_size)
    return web.FileResponse(file, headers={"Content-Type": "application/x-nix-nar"})


def build_cache_app(role: CacheRole) -> web.Application:
    app = web.Application()
    app[ROLE] = role
    app.router.add_get("/nix-cache-info", nix_cache_info)
    app.router.add_get(f"/{{hash:{HASH_RE}}}.narinfo", narinfo)
    app.router.add_get("/nar/{name}", nar)
    app.router.add_put(
        "/{name:.*}", cache_upload.handle, expect_handler=cache_upload.expect_continue
    )
    add_ops_routes(app, role.readiness)
    return app


def role_from_settings(settings: MeshSettings) -> CacheRole:
    directory = settings.cache_dir or settings.state_dir / "cache"
    files = CacheFiles(
        directory,
        TrustedKeys.parse(settings.trusted_public_keys),
        max_nar_bytes=settings.upload_max_nar_bytes,
    )
    return CacheRole(settings.node, files, settings.upload_token_file, settings.priority)


@dataclass
class CacheServer:
    url: str
    runners: list[web.AppRunner]

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


async def start_cache(settings: MeshSettings) -> CacheServer:
    """The cache started (after removing what crashed uploads left), with a separate ops
    server when `metrics_port` is set."""
    role = role_from_settings(settings)
    role.files.remove_leftovers()  # before serving: no upload is in flight yet
    runner = web.AppRunner(build_cache_app(role), access_log=None)
    await runner.setup()
    server = CacheServer("", [runner])
    host, _, port = settings.listen.rpartition(":")
    await web.TCPSite(runner, host or "0.0.0.0", int(port)).start()
    bound = runner.addresses[0][1] if runner.addresses else int(port)
    server.url = (settings.public_url or f"http://{host or '127.0.0.1'}:{bound}").rstrip("/")
    if settings.metrics_port is not None:
        ops = await serve_ops(settings.metrics_host, settings.metrics_port, role.readiness)
        server.runners.append(ops)
    log.info("cluster binary cache %s serving at %s", role.files.root, server.url)
    return server


async def run_cache(settings: MeshSettings, stop: asyncio.Event) -> None:
    """Serve the cache directory (uploads included) until `stop` is set."""
    server = await start_cache(settings)
    try:
        await stop.wait()
    finally:
        await server.close()
