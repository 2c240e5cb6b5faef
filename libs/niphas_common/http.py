"""The operational HTTP endpoints every service exposes: /healthz, /readyz, /metrics.

A service with its own aiohttp app (eval's webhooks, mesh's cache) adds these routes to it;
one without an HTTP API runs `serve_ops` on its metrics port.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

Readiness = Callable[[], Awaitable[str | None]]
"""Returns None when ready, else the reason it is not (shown in the /readyz body)."""


def add_ops_routes(app: web.Application, readiness: Readiness) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        reason = await readiness()
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


async def serve_ops(host: str, port: int, readiness: Readiness) -> web.AppRunner:
    """Start a bare ops server; the caller cleans up with `await runner.cleanup()`."""
    app = web.Application()
    add_ops_routes(app, readiness)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
