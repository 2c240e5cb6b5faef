"""The one place that builds the reporter's clients and wires them together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from niphas_common.bus.build_logs import log_reader
from niphas_common.bus.bus import Bus
from niphas_common.repo_credentials import CredentialsFile
from niphas_common.service import ServiceSpec, running
from niphas_common.settings import NatsSettings

from .logs_http import LogsEndpoint
from .poster import RetryPolicy, StatusPoster
from .reporter import Reporter
from .settings import ReporterSettings
from .statuses import Statuses, drv_hash

log = logging.getLogger(__name__)


def log_url(settings: ReporterSettings, drv_path: str) -> str:
    return f"{settings.public_url.rstrip('/')}/logs/drv/{drv_hash(drv_path)}"


def push_logs_url(settings: ReporterSettings, commit: str) -> str:
    return f"{settings.public_url.rstrip('/')}/logs/push/{commit}"


@contextlib.asynccontextmanager
async def wired(bus: Bus, settings: ReporterSettings) -> AsyncIterator[Reporter]:
    """The reporter's handlers with their poster; queued statuses are dropped on exit."""
    credentials = CredentialsFile(settings.credentials_file, log)
    poster = StatusPoster(
        credentials,
        RetryPolicy(settings.attempts, settings.backoff_s, settings.backoff_max_s),
        timeout_s=settings.request_timeout_s,
        queue_size=settings.queue_size,
    )
    statuses = Statuses(
        settings.context_prefix,
        lambda drv: log_url(settings, drv),
        lambda commit: push_logs_url(settings, commit),
    )
    try:
        yield Reporter(statuses, poster, settings.durable_prefix)
    finally:
        await poster.close()


def http_app(bus: Bus, settings: ReporterSettings) -> web.Application:
    """The logs (and, added by the runtime, /healthz /readyz /metrics)."""
    app = web.Application()
    LogsEndpoint(log_reader(bus), settings.logs_token_file).add_routes(app)
    return app


async def main(stop: asyncio.Event) -> None:
    settings = ReporterSettings()
    async with (
        running("reporter", settings, NatsSettings(), stop=stop) as runtime,
        wired(runtime.bus, settings) as reporter,
    ):
        app = http_app(runtime.bus, settings)
        runtime.add_ops_routes(app)
        server = web.AppRunner(app, access_log=None)
        await server.setup()
        try:
            try:
                await web.TCPSite(server, settings.http_host, settings.http_port).start()
            except OSError as exc:
                # Statuses go on without the log server (e.g. its port taken on a laptop).
                log.error(
                    "logs not served on %s:%d: %s",
                    settings.http_host,
                    settings.http_port,
                    exc.strerror,
                )
            else:
                log.info("logs on %s:%d", settings.http_host, settings.http_port)
            await runtime.bus.serve(reporter.subscriptions(), stop)
        finally:
            await server.cleanup()


service = ServiceSpec(
    name="reporter",
    summary="Report the pipeline to the forge as commit statuses and serve build logs",
    main=main,
    settings=(ReporterSettings,),
)
