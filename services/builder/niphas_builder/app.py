"""The one place that builds the builder's clients and wires them together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from niphas_common.bus.build_logs import build_logs
from niphas_common.bus.bus import Bus
from niphas_common.bus.kv import BusError
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.signing import SecretKey, TrustedKeys
from niphas_common.service import ServiceRuntime, ServiceSpec, running
from niphas_common.settings import NatsSettings

from . import single_flight, supersede
from .builder import Builder
from .cache import BuildCache, load_or_create_key, with_upload_credentials
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
    runner = with_upload_credentials(
        runner or NixRunner(store=settings.store),
        settings.push_url,
        settings.cache_token_file,
        settings.cache_netrc_file,
    )
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
    claims = await bus.key_value(
        single_flight.BUCKET,
        ttl_s=settings.lease_ttl_s,
        description="Build leases and results by derivation",
    )
    heads = None
    if settings.supersede:
        kv = await bus.key_value(
            supersede.BUCKET,
            ttl_s=supersede.TTL_S,
            description="Newest commit per repository and ref",
        )
        heads = supersede.RefHeads(kv)
    logs = None
    if settings.logs:
        try:
            logs = await build_logs(
                bus,
                max_bytes=settings.logs_max_bytes,
                max_age_s=settings.logs_max_age_days * 86400.0,
            )
        except BusError as exc:
            # Builds matter more than their logs: build, keep the tail in build.done, say why.
            log.error(
                "build logs off: the stream BUILD_LOGS was refused (%s); set "
                "NIPHAS_BUILDER_LOGS_MAX_BYTES within the server's JetStream storage",
                exc,
            )
    executor = await make_executor(settings, runner, cache, key)
    flight = single_flight.SingleFlight(claims, settings.name, settings.lease_ttl_s)
    try:
        async with staging_endpoint(executor, settings):
            yield Builder(bus, settings, cache, executor, flight, heads, logs)
    finally:
        await executor.close()
        await cache.close()


async def main(stop: asyncio.Event) -> None:
    settings = BuilderSettings()
    async with running(
        "builder", settings, NatsSettings(), instance=settings.name, stop=stop
    ) as runtime:
        require_secrets(runtime, settings)
        await runtime.requirements_met(stop)
        await _serve(runtime, settings, stop)


def require_secrets(runtime: ServiceRuntime, settings: BuilderSettings) -> None:
    """Not ready, saying which Secret is missing, until the signing key and (for an http(s)
    cache) the upload token are there: the builder signs and pushes nothing without them."""
    if settings.secret_key_file is not None:
        runtime.requires_file(
            settings.secret_key_file,
            "the Secret niphas-cache-key (key secret-key; NIPHAS_BUILDER_SECRET_KEY_FILE)",
        )
    if settings.cache_token_file is not None and settings.push_url.startswith(("http:", "https:")):
        runtime.requires_file(
            settings.cache_token_file,
            "the Secret niphas-cache-upload (key token; NIPHAS_BUILDER_CACHE_TOKEN_FILE)",
        )


async def _serve(runtime: ServiceRuntime, settings: BuilderSettings, stop: asyncio.Event) -> None:
    async with wired(runtime.bus, settings) as builder:
        log.info(
            "builder %s: cache %s, executor %s, %d builds at once",
            settings.name,
            settings.push_url.partition("?")[0],
            settings.executor,
            settings.max_parallel_builds,
        )
        await runtime.bus.serve([builder.subscription()], stop)


service = ServiceSpec(
    name="builder",
    summary="Build evaluated derivations once cluster-wide and push them to the binary cache",
    main=main,
    settings=(BuilderSettings,),
)
