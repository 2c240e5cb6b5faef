"""One node's mesh agent at run time: the cache server, the index, the fetcher, the loops.

`start_agent` builds and starts everything from settings (app.py calls it; tests start several
agents, one per simulated node, the same way), after removing what a killed earlier run left
half-done (`leftovers.after_crash`); `Agent.run` keeps the store announcements and
the disk usage in step until stopped. The agent runs in a `ServiceRuntime` (tracing, the bus,
readiness); its `Router` over the bus feeds the holder index and carries announcements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from aiohttp import web

from niphas_common.bus.consumer import Subscription
from niphas_common.bus.topology import ConsumerSpec
from niphas_common.nix.errors import NixError
from niphas_common.nix.runner import PathInfo
from niphas_common.nix.signing import TrustedKeys
from niphas_common.service import ServiceRuntime
from niphas_common.settings import NatsSettings
from niphas_schemas import PathWanted

from .announcer import Announcer
from .cache_view import CacheView
from .fetcher import Fetcher
from .gc import Collector
from .index import HolderIndex
from .inflight import Inflight
from .last_use import LastUse
from .leftovers import after_crash
from .metrics import INDEX_PATHS
from .router import BusRouter, Router
from .server import build_server
from .settings import MeshSettings
from .state_lock import StateLock
from .store import NodeStore
from .upload_slots import UploadSlots
from .workload_caches import WorkloadCaches

log = logging.getLogger(__name__)


def want_consumer(node: str) -> ConsumerSpec:
    """Node `node`'s durable consumer of `path.wanted.<node>`: its own wants, nobody else's."""
    return ConsumerSpec(
        durable="mesh-" + node.replace(".", "_"),
        subject=PathWanted.subject,
        filter=f"{PathWanted.subject}.{node}",
        ack_wait_s=30.0,
        max_deliver=5,
    )


@dataclass
class Agent:
    settings: MeshSettings
    url: str
    store: NodeStore
    router: Router
    announcer: Announcer
    fetcher: Fetcher
    collector: Collector
    last_use: LastUse
    runtime: ServiceRuntime
    http: web.BaseRunner
    session: aiohttp.ClientSession
    state_lock: StateLock
    _reconciled: bool = field(default=False, init=False)

    @property
    def node(self) -> str:
        return self.settings.node

    @property
    def index(self) -> HolderIndex:
        return self.router.index

    def subscription(self) -> Subscription[PathWanted]:
        spec = want_consumer(self.node)
        return Subscription(PathWanted, spec, self.fetcher.handle_want, self.settings.concurrency)

    async def readiness(self) -> str | None:
        if not self.router.caught_up:
            return "reading the holder state"
        if not self._reconciled:
            return "announcing the store"
        return None

    async def run(self, stop: asyncio.Event) -> None:
        """Serve wants and keep announcements and disk usage in step until `stop` is set."""
        while not self.router.caught_up and not stop.is_set():
            await self.index.changed(0.1)
        await self.reconcile()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.runtime.bus.serve([self.subscription()], stop))
            tg.create_task(self._every(self.settings.rescan_interval_s, self.reconcile, stop))
            tg.create_task(self._every(self.settings.node_ttl_s / 3, self.heartbeat, stop))
            tg.create_task(self._every(self.settings.gc_interval_s, self.collect, stop))

    async def reconcile(self) -> None:
        """Announce what the store holds and the index does not know at this URL; withdraw
        what this node announced (at any URL: an earlier run's too) and no longer holds."""
        change = await self.store.scan()
        announced = self.index.held_by(self.url)
        present = {str(i.path) for i in self.store.paths()}
        for info in self.store.paths():
            if str(info.path) not in announced and self.store.is_signed(info):
                await self.announcer.available(info)
        for path in sorted(self.index.announced_by(self.node) - present):
            if not self.fetcher.fetching(path):  # its `fetching` word stands until it lands
                await self.announcer.withdrawn(path)
        if change.gained or change.lost:
            log.info("store: %d paths gained, %d lost", len(change.gained), len(change.lost))
        INDEX_PATHS.labels(self.node).set(len(self.index))
        self.last_use.save()
        self._reconciled = True
        await self.sweep()

    async def heartbeat(self) -> None:
        """Rewrite this node's record: peers fetch from a node only while it is fresh."""
        await self.router.register(self.node, self.url)

    async def sweep(self) -> None:
        """Delete the holder records of nodes gone for `departed_after_s` (one node does it:
        the first serving one by name)."""
        now = datetime.now(UTC)
        if min(self.index.live_nodes(now), default=self.node) != self.node:
            return
        for node, keys in self.index.departed(now, self.settings.departed_after_s).items():
            log.info("node %s is gone: deleting its %d holder records", node, len(keys))
            await self.router.remove(keys)

    async def collect(self) -> list[PathInfo]:
        # Never what a want being answered has fetched so far (or holds already).
        return await self.collector.collect(keep=self.fetcher.needed())

    async def _every(self, seconds: float, job: object, stop: asyncio.Event) -> None:
        assert callable(job)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
            if stop.is_set():
                return
            try:
                await job()
            except (NixError, OSError) as exc:
                log.warning("%s failed: %s", getattr(job, "__name__", job), exc)

    async def close(self) -> None:
        await self.fetcher.close()
        with contextlib.suppress(Exception):  # NATS gone: peers find the address dead anyway
            await self.router.leave(self.node)
        await self.router.stop()
        await self.session.close()
        await self.http.cleanup()
        self.last_use.save()
        await self.runtime.close()
        self.state_lock.release()


async def start_agent(
    settings: MeshSettings, nats: NatsSettings, stop: asyncio.Event | None = None
) -> Agent:
    """Build every part from settings, start the HTTP server and the router. With `stop`,
    the connection to NATS is retried (the cache serves and /readyz says why meanwhile;
    `Stopped` when `stop` is set first); without, one failed attempt raises."""
    state = settings.node_state_dir
    state.mkdir(parents=True, exist_ok=True)
    state_lock = StateLock(state, settings.node)  # before touching anything in it
    runtime = ServiceRuntime("mesh", nats, instance=settings.node)
    try:
        return await _start(settings, runtime, state_lock, stop)
    except BaseException:
        await runtime.close()
        state_lock.release()
        raise


@dataclass
class _Local:
    """The node's own parts, ready before anything talks to the network."""

    trusted: TrustedKeys
    store: NodeStore
    last_use: LastUse
    inflight: Inflight
    incoming: Path


async def _open_local(settings: MeshSettings) -> _Local:
    trusted = TrustedKeys.parse(settings.trusted_public_keys)
    store = NodeStore(settings.store_root, trusted)
    await store.scan()
    state = settings.node_state_dir
    incoming = state / "incoming"
    # Nothing imports yet: whatever a killed earlier run left half-done goes now.
    await after_crash(store, incoming)
    inflight = Inflight(UploadSlots(settings.upload_slots))
    return _Local(trusted, store, LastUse(state / "last-use.json"), inflight, incoming)


async def _serve_cache(
    settings: MeshSettings, local: _Local, runtime: ServiceRuntime
) -> tuple[web.BaseRunner, str]:
    """The node's binary cache (with the ops endpoints) started; its runner and public URL."""
    view = CacheView(
        node=settings.node,
        store=local.store,
        last_use=local.last_use,
        compression=settings.nar_compression,
        priority=settings.priority,
        cache_dir=settings.effective_cache_dir,
        inflight=local.inflight,
        partial_wait_s=settings.stall_timeout_s / 2,
    )
    http = web.ServerRunner(build_server(view, runtime.readiness))
    await http.setup()
    host, _, port = settings.listen.rpartition(":")
    await web.TCPSite(http, host or "0.0.0.0", int(port)).start()
    bound = http.addresses[0][1] if http.addresses else int(port)
    url = settings.public_url or f"http://{host or '127.0.0.1'}:{bound}"
    return http, url.rstrip("/")


def _fetcher(
    settings: MeshSettings,
    local: _Local,
    router: Router,
    announcer: Announcer,
    collector: Collector,
    session: aiohttp.ClientSession,
) -> Fetcher:
    return Fetcher(
        store=local.store,
        index=router.index,
        announcer=announcer,
        last_use=local.last_use,
        incoming=local.incoming,
        trusted=local.trusted,
        session=session,
        inflight=local.inflight,
        fallback_caches=settings.fallback_caches.split(),
        workload_caches=WorkloadCaches.parse(settings.workload_caches, local.trusted),
        concurrency=settings.fetch_concurrency,
        peer_wait_s=settings.peer_wait_s,
        range_min_bytes=settings.range_min_bytes,
        range_bytes=settings.range_bytes,
        # A full disk under an import: one forced GC pass, then the want is tried again.
        free_space=lambda keep: collector.collect(force=True, keep=keep),
    )


async def _start(
    settings: MeshSettings,
    runtime: ServiceRuntime,
    state_lock: StateLock,
    stop: asyncio.Event | None,
) -> Agent:
    local = await _open_local(settings)
    agent: Agent | None = None

    async def agent_ready() -> str | None:
        return "starting" if agent is None else await agent.readiness()

    runtime.ready_when(agent_ready)
    http, url = await _serve_cache(settings, local, runtime)
    try:
        bus = await (runtime.connect() if stop is None else runtime.connect_retrying(stop))
        router = BusRouter(bus, HolderIndex(node_ttl_s=settings.node_ttl_s))
        await router.start()
        await router.register(settings.node, url)
        await runtime.serve_ops(settings)  # a separate ops port too, when one is set
    except BaseException:
        await http.cleanup()
        raise
    announcer = Announcer(router, settings.node, url)
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=settings.connect_timeout_s, sock_read=settings.stall_timeout_s
    )
    session = aiohttp.ClientSession(timeout=timeout)
    collector = Collector(
        local.store,
        local.last_use,
        lambda info: announcer.withdrawn(str(info.path)),
        node=settings.node,
        high_percent=settings.gc_high_percent,
        low_percent=settings.gc_low_percent,
    )
    fetcher = _fetcher(settings, local, router, announcer, collector, session)
    agent = Agent(
        settings,
        url,
        local.store,
        router,
        announcer,
        fetcher,
        collector,
        local.last_use,
        runtime,
        http,
        session,
        state_lock,
    )
    log.info(
        "mesh agent %s serving %s at %s", settings.node, settings.store_root or "/nix/store", url
    )
    return agent
