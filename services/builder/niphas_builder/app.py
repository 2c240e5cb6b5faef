"""The one place that builds the builder's clients and wires them together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from niphas_common.bus.bus import Bus
from niphas_common.http import serve_ops
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.signing import SecretKey, TrustedKeys
from niphas_common.service import ServiceSpec
from niphas_common.settings import NatsSettings
from niphas_common.tracing import setup_tracing

from . import lease, supersede
from .builder import Builder
from .cache import BuildCache, load_or_create_key
from .executor import Executor, LocalExecutor
from .sandbox import sandboxed_runner
from .settings import BuilderSettings
from .staging import StagingArea
from .staging_server import build_app

log = logging.getLogger(__name__)


def signing_key(settings: BuilderSettings) -> SecretKey:
    if settings.secret_key_file is None:
        return load_or_create_key(settings.key_file)
    return SecretKey.load(settings.secret_key_file)  # configured: never invent one


async def make_executor(
    settings: BuilderSettings, runner: NixRunner, cache: BuildCache, key: SecretKey
) -> Executor:
    if settings.executor == "kubernetes":
        from .kubernetes import JobExecutor

        staging = staging_area(settings, runner, cache, key)
        keys = [str(key.public_key), *settings.trusted_public_keys.split()]
        return await JobExecutor.from_settings(settings, staging, keys)
    # Builds get a nix of their own: sandbox forced, none of this process's environment.
    sandboxed = sandboxed_runner(runner.store, settings.state_dir / "builder" / "nix-home")
    return LocalExecutor(sandboxed, settings.name, settings.build_timeout_s)


def staging_area(
    settings: BuilderSettings, runner: NixRunner, cache: BuildCache, key: SecretKey
) -> StagingArea:
    return StagingArea(
        settings.state_dir / "builder" / "staging",
        key,
        runner,
        cache,
        base_url=settings.staging_base_url,
        compression=settings.compression,
        key_file=settings.key_file,
    )


@contextlib.asynccontextmanager
async def staging_endpoint(executor: Executor, settings: BuilderSettings) -> AsyncIterator[None]:
    """The staging endpoint build pods upload to, while an executor that needs it runs."""
    staging = getattr(executor, "staging", None)
    if not isinstance(staging, StagingArea):
        yield
        return
    app = build_app(staging, settings.staging_max_nar_bytes)
    server = web.AppRunner(app, access_log=None)
    await server.setup()
    await web.TCPSite(server, settings.staging_host, settings.staging_port).start()
    log.info("staging endpoint on %s:%d", settings.staging_host, settings.staging_port)
    try:
        yield
    finally:
        await server.cleanup()


@contextlib.asynccontextmanager
async def wired(
    bus: Bus, settings: BuilderSettings, runner: NixRunner | None = None
) -> AsyncIterator[Builder]:
    """A Builder with its cache, executor and KV buckets; closed on exit."""
    runner = runner or NixRunner(store=settings.store)
    key = signing_key(settings)
    trusted = TrustedKeys([key.public_key, *settings.trusted_public_keys.split()])
    cache = BuildCache(
        runner,
        push_url=settings.push_url,
        read_url=settings.read_url,
        key_file=settings.key_file,
        trusted=trusted,
        compression=settings.compression,
    )
    leases = await lease.open_bucket(
        bus.js, lease.BUCKET, settings.lease_ttl_s, "Build leases and results by derivation"
    )
    heads = None
    if settings.supersede:
        kv = await lease.open_bucket(
            bus.js, supersede.BUCKET, supersede.TTL_S, "Newest commit per repository and ref"
        )
        heads = supersede.RefHeads(kv)
    executor = await make_executor(settings, runner, cache, key)
    flight = lease.SingleFlight(leases, settings.name, settings.lease_ttl_s)
    try:
        async with staging_endpoint(executor, settings):
            yield Builder(bus, settings, cache, executor, flight, heads)
    finally:
        await executor.close()
        await cache.close()


async def main(stop: asyncio.Event) -> None:
    settings = BuilderSettings()
    setup_tracing("niphas-builder")
    bus = await Bus.connect(NatsSettings(), name=f"builder-{settings.name}")
    ops = None
    try:
        async with wired(bus, settings) as builder:
            if settings.metrics_port is not None:
                ops = await serve_ops(settings.metrics_host, settings.metrics_port, _ready)
            log.info(
                "builder %s: cache %s, executor %s, %d builds at once",
                settings.name,
                settings.push_url.partition("?")[0],
                settings.executor,
                settings.max_parallel_builds,
            )
            await bus.serve([builder.subscription()], stop)
    finally:
        if ops is not None:
            await ops.cleanup()
        await bus.close()


async def _ready() -> str | None:
    return None


service = ServiceSpec(
    name="builder",
    summary="Build evaluated derivations once cluster-wide and push them to the binary cache",
    main=main,
    settings=(BuilderSettings,),
)
