"""Wiring: builds every part of the csi service from its settings and runs it.

Nothing here needs a later stage to come up: the socket serves volumes whose closures are
already on the node even while NATS is unreachable; only fetching a missing path needs the bus
(connected in the background, retried until it answers).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer

from niphas_common.bus.bus import Bus
from niphas_common.http import Readiness
from niphas_common.leases import Leases
from niphas_common.nix.store_path import StoreDir
from niphas_common.service import ServiceRuntime, ServiceSpec, run_until_signalled
from niphas_common.settings import NatsSettings

from .closure import Closures, StoreDb
from .identity import IdentityService
from .node import NodeService
from .registrar import Registrar
from .registration import RegistrationService
from .server import socket_path, start_server
from .settings import CsiSettings
from .state import VolumeState
from .views import Views
from .volumes import FetchPolicy, Volumes
from .wants import PathWants

log = logging.getLogger(__name__)

BUS_RETRY_S = 2.0


def plugin_version() -> str:
    try:
        return version("niphas")
    except PackageNotFoundError:
        return "0.0.0"


def endpoint_of(settings: CsiSettings) -> str:
    return settings.endpoint or f"unix://{settings.state_dir / 'csi' / 'csi.sock'}"


def _start_wants(volumes: Volumes, node_id: str) -> Callable[[Bus], Awaitable[None]]:
    async def start(bus: Bus) -> None:
        wants = PathWants(bus, node_id)
        await wants.start()
        volumes.wants = wants

    return start


def _volumes(settings: CsiSettings) -> Volumes:
    root = settings.state_dir / "csi"
    store_root = settings.store_root
    return Volumes(
        state=VolumeState(root / "volumes"),
        leases=Leases(store_root),
        views=Views(root / "staging", StoreDir(root=store_root)),
        closures=Closures(StoreDb(store_root, settings.store_db_timeout_s), settings.concurrency),
        wants=None,
        fetch=FetchPolicy(settings.fetch_timeout_s, settings.presence_recheck_s),
    )


def _registered(registrar: Registrar) -> Readiness:
    async def check() -> str | None:
        return registrar.service.not_ready()

    return check


def _registrar(settings: CsiSettings) -> Registrar | None:
    if settings.registration_dir is None:
        return None
    csi_socket = socket_path(endpoint_of(settings))
    service = RegistrationService(settings.kubelet_socket or csi_socket)
    return Registrar(settings.registration_dir, service, settings.registration_check_s)


async def run(settings: CsiSettings, stop: asyncio.Event, nats: NatsSettings | None = None) -> None:
    """Serve the CSI socket (and, when configured, kubelet's registration) until `stop`."""
    if os.geteuid() != 0:
        raise SystemExit("the csi service mounts volumes and must run as root")
    runtime = ServiceRuntime("csi", nats or NatsSettings(), instance=settings.node_id)
    registrar = _registrar(settings)  # first: a bad registration dir fails before anything runs
    volumes = _volumes(settings)
    await volumes.reconcile()
    endpoint = endpoint_of(settings)
    server = await start_server(
        endpoint,
        IdentityService(plugin_version(), lambda: True),
        NodeService(volumes, settings.node_id, settings.allowed_target_root),
        settings.max_concurrent_rpcs,
    )
    log.info("csi node %s serving %s", settings.node_id, endpoint)
    bus_task = asyncio.create_task(
        runtime.connect_until(stop, BUS_RETRY_S, _start_wants(volumes, settings.node_id))
    )
    try:
        if registrar is not None:
            runtime.ready_when(_registered(registrar), needs_bus=False)
        await runtime.serve_ops(settings)
        if registrar is not None:
            await registrar.start(socket_path(endpoint))
        await stop.wait()
    finally:
        if registrar is not None:
            await registrar.close()  # kubelet deregisters us before the CSI socket goes
        await server.stop(grace=5)
        await bus_task
        if volumes.wants is not None:
            await volumes.wants.stop()
            volumes.wants = None
        await runtime.close()


async def main(stop: asyncio.Event) -> None:
    await run(CsiSettings(), stop)


def command(
    endpoint: Annotated[
        str | None, typer.Option(help="unix:///path/csi.sock (default: <state dir>/csi/csi.sock)")
    ] = None,
    node_id: Annotated[str | None, typer.Option(help="This node's name")] = None,
    store_root: Annotated[
        Path | None, typer.Option(help="The node's Nix store root (nix --store); default: /")
    ] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Durable state directory")] = None,
    allowed_target_root: Annotated[
        Path | None, typer.Option(help="Only mount below this directory (kubelet's pods dir)")
    ] = None,
    registration_dir: Annotated[
        Path | None,
        typer.Option(
            help="Register with kubelet through this dir (<kubelet root>/plugins_registry)"
        ),
    ] = None,
    kubelet_socket: Annotated[
        Path | None,
        typer.Option(help="The CSI socket's path as kubelet sees it (default: the endpoint's)"),
    ] = None,
) -> None:
    """The CSI node plugin: mounts a read-only view of exactly a closure into pods."""
    overrides: dict[str, object] = {
        "endpoint": endpoint,
        "node_id": node_id,
        "store_root": store_root,
        "state_dir": state_dir,
        "allowed_target_root": allowed_target_root,
        "registration_dir": registration_dir,
        "kubelet_socket": kubelet_socket,
    }
    settings = CsiSettings.model_validate({k: v for k, v in overrides.items() if v is not None})
    asyncio.run(run_until_signalled(lambda stop: run(settings, stop)))


service = ServiceSpec(
    name="csi",
    summary="CSI node plugin: mounts a read-only view of exactly a closure into pods",
    main=main,
    command=command,
    settings=(CsiSettings,),
)
