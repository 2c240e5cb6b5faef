"""Fan-out between nodes while the first copy is still arriving: a node fetching a path from
the cache serves its verified narinfo and the NAR bytes it has so far, and a node that wants
the same path streams it from there instead of waiting for the import (the follower verifies
everything itself); the cache sends each NAR once."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from niphas_common.bus.bus import Bus
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready
from tests.niphas_mesh.servers import counting_cache
from tests.niphas_mesh.test_fetch import announce_cache, has_closure, verify_store, want
from tests.nix_harness import BuiltClosure, FileCache

pytestmark = [pytest.mark.nix, pytest.mark.root, pytest.mark.slow]


def served(node: str, source: str) -> float:
    labels = {"node": node, "source": source}
    return REGISTRY.get_sample_value("niphas_mesh_served_bytes_total", labels) or 0.0


async def test_a_follower_streams_from_a_node_still_fetching(
    bus: Bus, start_node: StartNode, built_closure: BuiltClosure, signed_cache: FileCache
) -> None:
    hold = asyncio.Event()
    async with counting_cache(signed_cache.dir, hold) as (cache_url, cached):
        await announce_cache(bus, cache_url, built_closure)
        leader = await start_node("leader")
        follower = await start_node("follower")
        await ready(leader)
        await ready(follower)
        await want(bus, "leader", built_closure)
        app = built_closure.app.hash_part

        def leader_is_receiving() -> bool:
            partial = leader.fetcher.inflight.get(app)
            return partial is not None and partial.file is not None

        # The cache holds every NAR at half way: the leader cannot finish any path.
        await eventually(leader_is_receiving, 30)
        await want(bus, "follower", built_closure)

        def follower_is_streaming() -> bool:
            partial = leader.fetcher.inflight.get(app)
            return partial is not None and partial.readers > 0

        await eventually(follower_is_streaming, 30)
        assert not has_closure(leader, built_closure)
        hold.set()
        await eventually(lambda: has_closure(follower, built_closure), 60)
        await eventually(lambda: has_closure(leader, built_closure), 60)
    assert set(cached.nar_requests.values()) == {1}
    assert served("leader", "fetching") > 0
    await verify_store(follower)
    await verify_store(leader)
