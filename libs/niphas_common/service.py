"""How services are found and run.

A service registers an entry point in the `niphas.services` group pointing at a `ServiceSpec`;
the CLI finds it there, so this library never imports a service. `run_until_signalled` turns
SIGTERM/SIGINT into a stop event: consumers stop fetching, finish in-flight events, and the
connection drains before the process exits.

Every service process runs inside a `ServiceRuntime` (usually through `running`), which owns
what they all share: tracing (service name `niphas-<service>`), the one bus connection (named
`niphas-<service>-<instance>` in NATS's monitoring), readiness (what the service requires, such as
a Secret's file, then its local checks, then the bus connection, then the checks that need the
bus) and the ops endpoints (/healthz, /readyz, /metrics) on `metrics_host:metrics_port`, or on
the service's own HTTP app.

A missing Secret never crash-loops a pod: the service registers what it needs
(`requires_file`; the NATS password is registered by the runtime itself), /readyz answers 503
naming it, the log says so once (and again at a low rate), and `requirements_met` waits for it
where the service cannot start without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from aiohttp import web
from pydantic_settings import BaseSettings

from niphas_common.bus.bus import Bus
from niphas_common.http import Readiness, add_ops_routes, serve_ops
from niphas_common.requirements import Requirements
from niphas_common.settings import NatsSettings, ServiceSettings
from niphas_common.tracing import setup_tracing

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "niphas.services"
SERVICE_ORDER = ("mesh", "csi", "builder", "eval", "operator", "reporter")
"""Start order for `niphas up`: nothing needs a later stage to come up."""

ServiceMain = Callable[[asyncio.Event], Awaitable[None]]
BUS_RETRY_S = 2.0
"""Seconds between connection attempts while NATS does not answer (or refuses us)."""


class Stopped(Exception):
    """The service was told to stop before it could start (e.g. while waiting for NATS or a
    Secret); `run_until_signalled` ends quietly on it."""


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
        spec = load_spec(ep)
        if spec is not None:
            found[ep.name] = spec
    return {name: found[name] for name in in_start_order(found)}


def load_spec(ep: EntryPoint) -> ServiceSpec | None:
    """The service an entry point declares; None when it is declared but not built into this
    tree (a missing dependency of an existing service, another module name, still fails)."""
    try:
        spec = ep.load()
    except ModuleNotFoundError as exc:
        if exc.name is not None and ep.module.startswith(exc.name):
            log.debug("service %s declared but %s is absent", ep.name, ep.module)
            return None
        raise
    if not isinstance(spec, ServiceSpec):
        raise TypeError(f"entry point {ep.name} = {ep.value} is not a ServiceSpec")
    return spec


def in_start_order(names: Iterable[str]) -> list[str]:
    """`names` in SERVICE_ORDER, names it does not list last."""
    rank = {name: i for i, name in enumerate(SERVICE_ORDER)}
    return sorted(names, key=lambda name: rank.get(name, len(rank)))


async def run_until_signalled(main: ServiceMain) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await main(stop)
    except Stopped:
        log.info("stopped before starting")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def trace_name(service: str) -> str:
    """The OpenTelemetry `service.name` of every process of `service`."""
    return f"niphas-{service}"


async def _provisioned(_: Bus) -> None:
    """Nothing more to do once connected (`Bus.connect` provisions the streams)."""


class ServiceRuntime:
    """Tracing, the bus connection, readiness and the ops server of one service process."""

    def __init__(
        self, service: str, nats: NatsSettings, *, instance: str = "", bus: Bus | None = None
    ) -> None:
        """`bus`: an already connected bus the runtime takes over (tests)."""
        self.service = service
        self.nats = nats
        self.connection_name = f"niphas-{service}-{instance}" if instance else f"niphas-{service}"
        self._bus: Bus | None = bus
        self._local: list[Readiness] = []
        self._remote: list[Readiness] = []
        self._ops: web.AppRunner | None = None
        self.requirements = Requirements(service)
        if nats.user and not nats.password:
            # From the Secret niphas-nats through an optional env reference: the server
            # refuses us without it, and the environment is read only at start.
            self.requirements.setting(
                "NIPHAS_NATS_PASSWORD",
                False,
                "create the Secret niphas-nats (key password), then restart this pod",
            )
        setup_tracing(trace_name(service))

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError(f"{self.service}: the bus is not connected yet")
        return self._bus

    @property
    def has_bus(self) -> bool:
        return self._bus is not None

    async def connect(self) -> Bus:
        """Connect once (provisioning every stream); fails when NATS does not answer."""
        self._bus = await Bus.connect(self.nats, name=self.connection_name)
        return self._bus

    async def connect_until(
        self, stop: asyncio.Event, retry_s: float, then: Callable[[Bus], Awaitable[None]]
    ) -> Bus | None:
        """Connect and run `then` on the new bus, retrying both until they succeed or `stop`
        is set (for a service that serves before NATS answers). Never cancelled half-way,
        which would leave a half-open connection behind. Logs one line per new reason."""
        last = ""
        while not stop.is_set():
            bus: Bus | None = None
            try:
                bus = await self._connect_unless_stopped(stop)
                if bus is None:
                    return None
                await then(bus)
            except Exception as exc:
                reason = f"{exc.__class__.__name__}: {exc}" if str(exc) else repr(exc)
                if reason != last:
                    hint = self.requirements.check()
                    log.warning(
                        "%s: bus not reachable yet (%s)%s",
                        self.service,
                        reason,
                        f"; {hint}" if hint else "",
                    )
                    last = reason
                if bus is not None:
                    with contextlib.suppress(Exception):
                        await bus.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), retry_s)
                continue
            self._bus = bus
            return bus
        return None

    async def connect_retrying(self, stop: asyncio.Event) -> Bus:
        """Connect, retrying every `BUS_RETRY_S` until NATS answers; `Stopped` when `stop`
        is set first."""
        bus = await self.connect_until(stop, BUS_RETRY_S, _provisioned)
        if bus is None:
            raise Stopped
        return bus

    def ready_when(self, check: Readiness, *, needs_bus: bool = True) -> None:
        """Add a readiness check: run before the bus check when it does not need the bus."""
        (self._remote if needs_bus else self._local).append(check)

    async def _connect_unless_stopped(self, stop: asyncio.Event) -> Bus | None:
        """`Bus.connect`, given up when `stop` is set first (nats-py retries a refused first
        connection by itself, forever with our options)."""
        connected: list[Bus] = []

        async def connect() -> None:
            # Kept outside the task: a task cancelled as its coroutine returns drops the result.
            connected.append(await Bus.connect(self.nats, name=self.connection_name))

        connecting = asyncio.create_task(connect())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            connecting.cancel()  # we are cancelled ourselves
            raise
        finally:
            stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            for bus in connected:  # it connected just as we gave up
                await bus.close()
            return None
        connecting.result()
        return connected[0]

    def requires_file(self, path: Path, what: str) -> None:
        """Not ready (and an ERROR in the log) while `path` is missing or empty; `what` says
        where it comes from ("the Secret niphas-cache-key, key secret-key")."""
        self.requirements.file(path, what)

    async def requirements_met(self, stop: asyncio.Event) -> None:
        """Wait until every requirement is met; `Stopped` when `stop` is set first."""
        if not await self.requirements.wait(stop):
            raise Stopped

    async def readiness(self) -> str | None:
        """None when ready, else the first reason it is not."""
        if (reason := self.requirements.check()) is not None:
            return reason
        for check in self._local:
            if (reason := await check()) is not None:
                return reason
        if self._bus is None or not self._bus.connected:
            return "NATS not connected"
        for check in self._remote:
            if (reason := await check()) is not None:
                return reason
        return None

    def add_ops_routes(self, app: web.Application) -> None:
        """Serve /healthz, /readyz and /metrics on the service's own HTTP app."""
        add_ops_routes(app, self.readiness)

    async def serve_ops(self, settings: ServiceSettings) -> None:
        """Start the ops server on `metrics_host:metrics_port` when a port is set."""
        if settings.metrics_port is not None and self._ops is None:
            self._ops = await serve_ops(
                settings.metrics_host, settings.metrics_port, self.readiness
            )

    async def close(self) -> None:
        """Stop the ops server, then drain the bus."""
        if self._ops is not None:
            await self._ops.cleanup()
            self._ops = None
        bus, self._bus = self._bus, None
        if bus is not None:
            with contextlib.suppress(Exception):
                await bus.close()


@contextlib.asynccontextmanager
async def running(
    service: str,
    settings: ServiceSettings,
    nats: NatsSettings,
    *,
    instance: str = "",
    ops_server: bool = True,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[ServiceRuntime]:
    """A connected `ServiceRuntime` (and its ops server unless `ops_server` is False: the
    service then adds the routes to its own app), closed on exit. The ops server starts
    first, so /readyz says why while NATS does not answer. With `stop`, connecting is retried
    until it succeeds (`Stopped` when `stop` is set first); without, one failed attempt
    raises."""
    runtime = ServiceRuntime(service, nats, instance=instance)
    try:
        if ops_server:
            await runtime.serve_ops(settings)
        if stop is None:
            await runtime.connect()
        else:
            await runtime.connect_retrying(stop)
        yield runtime
    finally:
        await runtime.close()
