"""Wiring of the mesh agent: `niphas mesh` (and `niphas up`) run it from here."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import typer
import uvloop

from niphas_common.service import ServiceSpec, run_until_signalled
from niphas_common.settings import NatsSettings

from .agent import start_agent
from .cache_role import run_cache
from .settings import MeshSettings
from .state_lock import StateInUse


async def run(settings: MeshSettings, nats: NatsSettings, stop: asyncio.Event) -> None:
    if settings.role == "cache":
        await run_cache(settings, stop)  # a directory over HTTP: no store, no NATS
        return
    agent = await start_agent(settings, nats, stop)
    try:
        await agent.run(stop)
    finally:
        await agent.close()


async def main(stop: asyncio.Event) -> None:
    await run(MeshSettings(), NatsSettings(), stop)


def command(
    listen: Annotated[
        str | None, typer.Option(help="HOST:PORT to serve the binary cache on")
    ] = None,
    store_root: Annotated[
        str | None, typer.Option(help="Chroot store root; empty: the host's store")
    ] = None,
    nats_url: Annotated[str | None, typer.Option(help="NATS server URL(s)")] = None,
    node: Annotated[str | None, typer.Option(help="This node's name")] = None,
) -> None:
    """Every node a Nix binary cache: serve the store, fetch wanted closures from peers."""
    # Flags win over the environment: set them as the variables the settings read.
    flags = {"LISTEN": listen, "STORE_ROOT": store_root, "NODE": node}
    os.environ.update({f"NIPHAS_MESH_{k}": v for k, v in flags.items() if v is not None})
    settings = MeshSettings()
    nats = NatsSettings() if nats_url is None else NatsSettings(url=nats_url)
    loop_factory = uvloop.new_event_loop if settings.event_loop == "uvloop" else None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run_until_signalled(lambda stop: run(settings, nats, stop)))
    except StateInUse as exc:
        typer.echo(f"niphas mesh: {exc}", err=True)
        raise typer.Exit(2) from None


service = ServiceSpec(
    name="mesh",
    summary="Every node a Nix binary cache: peer-to-peer substitution with full verification",
    main=main,
    command=command,
    settings=(MeshSettings,),
)
