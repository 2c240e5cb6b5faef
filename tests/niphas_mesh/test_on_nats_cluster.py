"""The mesh on a 3-server JetStream cluster (3 replicas): who holds what (the holders state
bucket) survives losing the server leading it (read through the new leader while that server
stays down), and a node then wanting a closure only a peer holds fetches it from that peer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.bus.topology import stream_configs, stream_name
from niphas_common.nats_cluster import EmbeddedNatsCluster
from niphas_common.settings import NatsSettings
from niphas_mesh.agent import want_consumer
from niphas_schemas import HOLDERS_BUCKET, PathWanted
from niphas_schemas.holders import path_key
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready, seed
from tests.niphas_mesh.test_fetch import has_closure, verify_store, want
from tests.nix_harness import BuiltClosure, CacheKey, FileCache


async def consumer_exists(bus: Bus, durable: str) -> bool:
    try:
        await bus.js.consumer_info(stream_name(PathWanted.subject), durable)
    except Exception:  # not created yet
        return False
    return True


async def eventually_async(check: Callable[[], Awaitable[bool]], timeout_s: float = 30) -> None:
    for _ in range(int(timeout_s / 0.2)):
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout_s}s")


@pytest.fixture
def nats_settings(cluster_settings: NatsSettings) -> NatsSettings:
    """The nodes' agents reach the cluster (every server's URL, 3 replicas)."""
    return cluster_settings


@pytest.fixture
def bus(cluster_bus: Bus) -> Bus:
    return cluster_bus


@pytest.mark.nix
@pytest.mark.root
async def test_holders_survive_losing_their_leader_and_a_node_fetches_from_the_peer(
    bus: Bus,
    nats_cluster: EmbeddedNatsCluster,
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    seed(tmp_path / "nodes" / "n1", signed_cache, cache_key, [built_closure.app])
    holder = await start_node("n1")
    await ready(holder)
    joined = await start_node("n2")  # holds nothing, and no cache is configured
    await ready(joined)
    state = await bus.state(HOLDERS_BUCKET)
    assert (await bus.js.stream_info(state.stream)).config.num_replicas == 3
    for node in ("n1", "n2"):  # both agents consume their wants before the server goes
        await eventually_async(partial(consumer_exists, bus, want_consumer(node).durable))

    leader = nats_cluster.stream_leader(state.stream)
    assert leader is not None
    nats_cluster.kill(leader)
    await eventually(lambda: nats_cluster.stream_leader(state.stream) not in (None, leader), 30)
    # What n1 announced is still there, read through the new leader.
    for path in built_closure.paths:
        entry = await state.get(path_key(str(path), "node", "n1", holder.url))
        assert entry is not None, path
    streams = [config.name or "" for config in stream_configs(bus.settings)]
    await eventually(lambda: None not in {nats_cluster.stream_leader(s) for s in streams}, 30)

    # Only n1 holds the closure: n2 finds it through the holders and fetches it from n1.
    assert joined.index.held_by(holder.url) == {str(p) for p in built_closure.paths}
    await want(bus, "n2", built_closure)
    await eventually(lambda: has_closure(joined, built_closure), 60)
    await verify_store(joined)
