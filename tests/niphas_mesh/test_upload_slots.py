"""Upload slots: a node uploads NARs to a bounded number of peers at once; one more peer gets
503, and its fetcher waits for a free holder instead of going to the cache. Nix clients are
always served. A node waiting for its own download offers no narinfo for the path meanwhile
(a peer given one would ask for a NAR the node does not have yet and get 404)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from niphas_common.bus.bus import Bus
from niphas_common.nix.runner import NixRunner
from niphas_mesh.agent import Agent
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready, seed
from tests.niphas_mesh.servers import counting_cache
from tests.niphas_mesh.test_fetch import announce_cache, has_closure, verify_store, want
from tests.nix_harness import BuiltClosure, CacheKey, FileCache

pytestmark = [pytest.mark.nix, pytest.mark.root, pytest.mark.slow]


def fill_slots(agent: Agent) -> None:
    """The node uploads to as many peers as it takes (one, to a peer that is not a node here)."""
    uploads = agent.fetcher.inflight.uploads
    uploads.limit = 1
    uploads.peers["a-peer-elsewhere"] += 1


def free_slots(agent: Agent) -> None:
    del agent.fetcher.inflight.uploads.peers["a-peer-elsewhere"]


async def status(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status


async def test_a_busy_holder_is_waited_for_not_the_cache(
    bus: Bus,
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    seed(tmp_path / "nodes" / "holder", signed_cache, cache_key, built_closure.paths)
    async with counting_cache(signed_cache.dir) as (cache_url, served):
        await announce_cache(bus, cache_url, built_closure)
        holder = await start_node("holder")
        follower = await start_node("follower", peer_wait_s=60.0)
        await ready(holder)
        await ready(follower)
        await eventually(lambda: bool(follower.index.held_by(holder.url)))
        fill_slots(holder)
        await want(bus, "follower", built_closure)
        await eventually(lambda: holder.fetcher.inflight.uploads.refused >= 2)
        app = built_closure.app.hash_part
        # Turned away, the follower has no NAR file for the path: it offers no narinfo.
        partial = follower.fetcher.inflight.get(app)
        assert partial is not None and partial.info is None
        assert await status(f"{follower.url}/{app}.narinfo") == 404
        assert not has_closure(follower, built_closure)
        free_slots(holder)
        await eventually(lambda: has_closure(follower, built_closure), 60)
    assert served.nar_bytes == 0  # it waited for the peer; the cache sent nothing
    await verify_store(follower)


async def test_nix_clients_are_served_when_the_slots_are_full(
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    seed(tmp_path / "nodes" / "holder", signed_cache, cache_key, built_closure.paths)
    holder = await start_node("holder")
    await ready(holder)
    fill_slots(holder)
    nar = f"{holder.url}/nar/{built_closure.app.hash_part}.nar"
    assert await status(nar) == 503  # a peer (no Nix User-Agent) is turned away
    client = tmp_path / "client"
    runner = NixRunner(store=str(client), options={"trusted-public-keys": str(cache_key.public)})
    await runner.arun(
        "nix", "copy", "--from", holder.url, "--to", str(client), str(built_closure.app)
    )
    assert (client / "nix" / "store" / built_closure.app.base_name).exists()
    assert holder.fetcher.inflight.uploads.refused == 1
