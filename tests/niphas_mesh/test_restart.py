"""A node that comes back at another URL (a restarted agent, a new pod IP): its new
announcements replace the old URL in every peer's index, and what it lost while it was down is
withdrawn, so peers neither try the dead address nor keep stale holdings."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.bus.topology import stream_name
from niphas_common.nix.runner import NixRunner
from niphas_common.settings import NatsSettings
from niphas_mesh.agent import Agent, start_agent
from niphas_mesh.settings import MeshSettings
from niphas_mesh.state_lock import StateInUse
from niphas_schemas import PathAvailable
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready, seed
from tests.niphas_mesh.servers import counting_cache
from tests.niphas_mesh.test_fetch import announce_cache, has_closure, want
from tests.nix_harness import BuiltClosure, CacheKey, FileCache

pytestmark = [pytest.mark.nix, pytest.mark.root]


class Running:
    """One agent run, stopped the way SIGTERM stops `niphas mesh`."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(agent.run(self._stop))

    async def stop(self) -> None:
        self._stop.set()
        try:
            await asyncio.wait_for(self._task, 30)
        finally:
            await self.agent.close()


async def _run(settings: MeshSettings, nats: NatsSettings) -> Running:
    running = Running(await start_agent(settings, nats))
    await ready(running.agent)
    return running


async def test_a_node_back_at_a_new_url_replaces_its_old_holdings(
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    cache_key: CacheKey,
    nats_settings: NatsSettings,
    tmp_path: Path,
) -> None:
    root = tmp_path / "nodes" / "n1"
    seed(root, signed_cache, cache_key, [built_closure.app])
    settings = MeshSettings(
        node="n1",
        listen="127.0.0.1:0",
        store_root=str(root),
        state_dir=tmp_path / "state",
        trusted_public_keys=str(cache_key.public),
        gc_high_percent=100.0,
        gc_interval_s=3600.0,
        rescan_interval_s=3600.0,
    )
    closure = {str(p) for p in built_closure.paths}
    app = str(built_closure.app)
    observer = await start_node("n2")
    await ready(observer)

    first = await _run(settings, nats_settings)
    old_url = first.agent.url
    await eventually(lambda: observer.index.held_by(old_url) == closure)
    await first.stop()

    # While the node is down its app is deleted; it comes back on another port.
    NixRunner(store=str(root)).run("nix-store", "--delete", app)
    second = await _run(settings, nats_settings)
    new_url = second.agent.url
    try:
        assert new_url != old_url
        await eventually(lambda: observer.index.held_by(new_url) == closure - {app})
        await eventually(lambda: observer.index.held_by(old_url) == set())
        assert observer.index.announced_by("n1") == closure - {app}
        assert [h.holder for h in observer.index.holdings(app)] == []
    finally:
        await second.stop()


async def test_a_rescan_during_a_fetch_keeps_its_fetching_word(
    bus: Bus,
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
) -> None:
    """Peers stream a path from a node that announced its fetch (`inflight`); the periodic
    rescan, which withdraws what the node announced and does not hold, must leave that alone."""
    hold = asyncio.Event()
    async with counting_cache(signed_cache.dir, hold) as (cache_url, _):
        await announce_cache(bus, cache_url, built_closure)
        node = await start_node("n3")
        observer = await start_node("n4")
        for agent in (node, observer):
            await ready(agent)
        await want(bus, node.node, built_closure)

        def fetching() -> set[str]:
            return {
                p
                for p in observer.index.announced_by("n3")
                if any(h.state == "fetching" for h in observer.index.holdings(p))
            }

        await eventually(lambda: len(fetching()) > 0)
        before = fetching()
        await node.reconcile()
        # Everything the rescan published is stored by now; the observer has read that far.
        stored = await bus.js.stream_info(stream_name(PathAvailable.subject))
        assert await observer.index.reached(stored.state.last_seq, 10)
        assert before <= fetching()
        hold.set()
        await eventually(lambda: has_closure(node, built_closure), 60)


async def test_one_agent_per_node_state(
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    cache_key: CacheKey,
    nats_settings: NatsSettings,
    tmp_path: Path,
) -> None:
    """A second agent over the same node state would remove the first one's downloads as a
    crash's leftovers: it refuses to start, naming the node; once the first stops, it starts."""
    root = tmp_path / "nodes" / "n5"
    root.mkdir(parents=True)
    settings = MeshSettings(
        node="n5",
        listen="127.0.0.1:0",
        store_root=str(root),
        state_dir=tmp_path / "state",
        trusted_public_keys=str(cache_key.public),
    )
    first = await _run(settings, nats_settings)
    try:
        with pytest.raises(StateInUse, match=r"another mesh agent for node n5 \(pid \d+\)"):
            await start_agent(settings, nats_settings)
    finally:
        await first.stop()
    second = await _run(settings, nats_settings)
    await second.stop()
