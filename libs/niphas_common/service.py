"""How services are found and run.

A service registers an entry point in the `niphas.services` group pointing at a `ServiceSpec`;
the CLI finds it there, so this library never imports a service. `run_until_signalled` turns
SIGTERM/SIGINT into a stop event: consumers stop fetching, finish in-flight events, and the
connection drains before the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

from pydantic_settings import BaseSettings

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "niphas.services"
SERVICE_ORDER = ("mesh", "csi", "builder", "eval", "operator")
"""Start order for `niphas up`: nothing needs a later stage to come up."""

ServiceMain = Callable[[asyncio.Event], Awaitable[None]]


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    summary: str
    main: ServiceMain
    """Runs the service until the event is set; builds every client itself (app.py)."""
    command: Callable[..., None] | None = None
    """A typer command with the service's own flags; default: run `main` with env settings."""
    extra_commands: tuple[tuple[str, Callable[..., None]], ...] = ()
    """More top-level `niphas` commands the service offers (e.g. operator's `rollback`)."""
    settings: tuple[type[BaseSettings], ...] = ()
    """The service's settings classes, listed by `niphas settings`."""


def discover() -> dict[str, ServiceSpec]:
    """Installed services by name, in start order."""
    found: dict[str, ServiceSpec] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            spec = ep.load()
        except ModuleNotFoundError as exc:
            # Declared but not built into this tree yet: reported as not installed. A missing
            # dependency of an existing service (another module name) still fails loudly.
            if exc.name is not None and ep.module.startswith(exc.name):
                log.debug("service %s declared but %s is absent", ep.name, ep.module)
                continue
            raise
        if not isinstance(spec, ServiceSpec):
            raise TypeError(f"entry point {ep.name} = {ep.value} is not a ServiceSpec")
        found[ep.name] = spec
    rank = {name: i for i, name in enumerate(SERVICE_ORDER)}
    return dict(sorted(found.items(), key=lambda item: rank.get(item[0], len(rank))))


async def run_until_signalled(main: ServiceMain) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await main(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
