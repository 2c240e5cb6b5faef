"""Fan-out between nodes while the first copy is still arriving: a node fetching a path from
the cache serves its verified narinfo and the NAR bytes it has so far, and a node that wants
the same path streams it from there instead of waiting for the import (the follower verifies
everything itself); the cache sends each NAR once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from niphas_common.bus.bus import Bus
from niphas_mesh.agent import Agent
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready
from tests.niphas_mesh.servers import counting_cache, hostile_peer
from tests.niphas_mesh.test_fetch import (
    announce_cache,
    announce_peer,
    has_closure,
    rejected,
    verify_store,
    want,
)
from tests.nix_harness import BuiltClosure, FileCache

pytestmark = [pytest.mark.nix, pytest.mark.root, pytest.mark.slow]


def served(node: str, source: str) -> float:
    labels = {"node": node, "source": source}
    return REGISTRY.get_sample_value("niphas_mesh_served_bytes_total", labels) or 0.0


def receiving(node: Agent, path_hash: str) -> bool:
    """The node has begun writing the NAR of `path_hash` to disk."""
    partial = node.fetcher.inflight.get(path_hash)
    return partial is not None and partial.file is not None


def relaying(node: Agent, path_hash: str) -> bool:
    """A peer streams the node's download of `path_hash` while it is still arriving."""
    partial = node.fetcher.inflight.get(path_hash)
    return partial is not None and partial.readers > 0


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

        # The cache holds every NAR at half way: the leader cannot finish any path.
        await eventually(lambda: receiving(leader, app), 30)
        await want(bus, "follower", built_closure)

        await eventually(lambda: relaying(leader, app), 30)
        assert not has_closure(leader, built_closure)
        hold.set()
        await eventually(lambda: has_closure(follower, built_closure), 60)
        await eventually(lambda: has_closure(leader, built_closure), 60)
    assert set(cached.nar_requests.values()) == {1}
    assert served("leader", "fetching") > 0
    await verify_store(follower)
    await verify_store(leader)


async def test_a_corrupt_download_streamed_on_is_rejected_and_fetched_elsewhere(
    bus: Bus,
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    tmp_path: Path,
) -> None:
    """The leader streams a corrupted NAR from a cache and the follower streams it on from the
    leader meanwhile: the leader's hash check fails, the follower's stream is cut (or fails
    the follower's own check), both report it and get a good copy from another cache."""
    outside = tmp_path / "outside"
    outside.mkdir()
    hold = asyncio.Event()
    app = built_closure.app.hash_part
    async with (
        hostile_peer("corrupt", signed_cache.dir, outside, hold) as evil_url,
        counting_cache(signed_cache.dir) as (good_url, good),
    ):
        # The corrupting cache is announced; the good one is each node's fallback (last).
        await announce_cache(bus, evil_url, built_closure, name="evil")
        leader = await start_node("leader", fallback_caches=good_url)
        follower = await start_node("follower", fallback_caches=good_url)
        await ready(leader)
        await ready(follower)
        await want(bus, "leader", built_closure)

        await eventually(lambda: receiving(leader, app), 30)
        await want(bus, "follower", built_closure)

        await eventually(lambda: relaying(leader, app), 30)
        hold.set()  # the rest of every corrupted NAR: the leader's NarHash check fails
        await eventually(lambda: has_closure(leader, built_closure), 60)
        await eventually(lambda: has_closure(follower, built_closure), 60)
    assert rejected("leader", "evil", "hash") > 0
    # The follower gave up on the leader's stream of the bad copy, then found a good one.
    assert sum(rejected("follower", "leader", r) for r in ("hash", "error", "stall", "nar")) > 0
    assert good.nar_bytes > 0
    await verify_store(leader)
    await verify_store(follower)
    assert list(outside.iterdir()) == []


async def test_each_node_starts_on_the_rarest_paths_in_an_order_of_its_own(
    bus: Bus, start_node: StartNode, built_closure: BuiltClosure
) -> None:
    """Rarest first (fewest holders known), random among equals: nodes wanting one closure at
    once start on different paths rather than all on the same one."""
    paths = built_closure.paths
    assert len(paths) >= 3
    common, rare = paths[0], paths[1:]
    await announce_cache(bus, "http://127.0.0.1:9/cache", built_closure)
    # One more holder of the first path: it is the least rare.
    only_common = BuiltClosure(common, {str(common): built_closure.infos[str(common)]})
    await announce_peer(bus, "peer", "http://127.0.0.1:9/peer", only_common)
    node = await start_node("n1")
    await ready(node)
    await eventually(lambda: len(node.index.holdings(str(common))) == 2, 30)
    assert all(len(node.index.holdings(str(p))) == 1 for p in rare)
    orders = [node.fetcher.fetch_order(paths) for _ in range(40)]
    assert all(order[-1] == common for order in orders)
    assert all(set(order[:-1]) == set(rare) for order in orders)
    # Among equally rare paths, not one fixed order (40 draws of >= 2 paths).
    assert len({tuple(order[:-1]) for order in orders}) > 1
