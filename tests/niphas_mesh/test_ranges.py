"""One large NAR in byte ranges from several peers: every peer serves some of its ranges
(requests counted at the peers); a peer that corrupts its ranges is caught by NarHash over the
reassembled NAR, reported, and its ranges come from the others; when every peer's bytes are
wrong, nothing is imported from them and the path comes from the cache."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from niphas_common.bus.bus import Bus
from niphas_mesh.agent import Agent
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready
from tests.niphas_mesh.servers import Served, counting_cache, range_peer
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


async def fetch_with_peers(
    bus: Bus,
    start_node: StartNode,
    closure: BuiltClosure,
    cache: FileCache,
    name: str,
    corrupt: dict[str, bool],
) -> tuple[Agent, dict[str, Served], Served, str]:
    """Peers (name -> corrupts?) and the cache announce the closure; node `name` wants it, with
    ranges of about an eighth of the largest NAR. Returns the node, what each peer and the
    cache served, and the largest path's hash part."""
    largest = max(closure.infos.values(), key=lambda i: i.nar_size)
    async with AsyncExitStack() as stack:
        cache_url, cached = await stack.enter_async_context(counting_cache(cache.dir))
        await announce_cache(bus, cache_url, closure)
        peers = {}
        for peer, bad in corrupt.items():
            url, served = await stack.enter_async_context(range_peer(cache.dir, bad))
            await announce_peer(bus, peer, url, closure)
            peers[peer] = served
        node = await start_node(
            name, range_min_bytes=largest.nar_size, range_bytes=largest.nar_size // 8 + 1
        )
        await ready(node)
        await want(bus, name, closure)
        await eventually(lambda: has_closure(node, closure), 60)
    await verify_store(node)
    return node, peers, cached, largest.path.hash_part


async def test_a_large_nar_arrives_in_ranges_from_several_peers(
    bus: Bus, start_node: StartNode, built_closure: BuiltClosure, signed_cache: FileCache
) -> None:
    honest = {"p1": False, "p2": False, "p3": False}
    _, peers, cached, big = await fetch_with_peers(
        bus, start_node, built_closure, signed_cache, "ranged", honest
    )
    assert all(served.nar_requests[big] >= 1 for served in peers.values())
    assert sum(served.range_requests for served in peers.values()) >= 8
    assert cached.nar_bytes == 0


async def test_a_peer_corrupting_its_ranges_is_rejected_and_they_come_from_others(
    bus: Bus, start_node: StartNode, built_closure: BuiltClosure, signed_cache: FileCache
) -> None:
    peers = {"good1": False, "good2": False, "evil": True}
    _, served, cached, big = await fetch_with_peers(
        bus, start_node, built_closure, signed_cache, "mixed", peers
    )
    assert served["evil"].nar_requests[big] >= 1  # it did get ranges to serve
    assert served["evil"].range_requests >= 1
    assert rejected("mixed", "evil", "hash") > 0
    assert rejected("mixed", "good1", "hash") == rejected("mixed", "good2", "hash") == 0
    assert cached.nar_bytes == 0  # the good peers served everything in the end


async def test_verification_still_catches_a_wrong_narhash(
    bus: Bus, start_node: StartNode, built_closure: BuiltClosure, signed_cache: FileCache
) -> None:
    peers = {"bad1": True, "bad2": True}
    _, served, cached, big = await fetch_with_peers(
        bus, start_node, built_closure, signed_cache, "strict", peers
    )
    assert all(s.nar_requests[big] >= 1 and s.range_requests >= 1 for s in served.values())
    assert rejected("strict", "bad1", "hash") > 0
    assert rejected("strict", "bad2", "hash") > 0
    assert cached.nar_bytes > 0  # only the cache had good copies
