"""Fetching on `path.wanted` between nodes (chroot stores with their own agents on loopback,
a real nats-server, real nix): five nodes get a closure from the node that holds it while the
cache serves no byte; hostile peers (corrupted NAR, wrong NarHash, stripped or forged signature,
traversal names, an escaping symlink) are rejected and reported and the path comes from another
holder; a stalled peer is abandoned; ten concurrent wants make one download; a want nobody can
meet ends with a `failed` announcement at its deadline."""

from __future__ import annotations

from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from niphas_common.bus.bus import Bus
from niphas_common.nix.runner import NixRunner
from niphas_mesh.agent import Agent
from niphas_schemas import HOLDERS_BUCKET, NodeRecord, PathAvailable, PathWanted
from niphas_schemas.holders import node_key
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready, seed
from tests.niphas_mesh.servers import MODES, counting_cache, hostile_peer
from tests.nix_harness import BuiltClosure, CacheKey, FileCache

pytestmark = [pytest.mark.nix, pytest.mark.root, pytest.mark.slow]


async def announce_cache(bus: Bus, url: str, closure: BuiltClosure, name: str = "cache") -> None:
    """What the builder publishes for the paths it pushed to the cache."""
    for info in closure.infos.values():
        await bus.publish(
            PathAvailable(
                holder_kind="cache",
                holder=name,
                holder_url=url,
                store_path=str(info.path),
                nar_hash=info.nar_hash.nix32,
                nar_size=info.nar_size,
                references=tuple(str(r) for r in info.references),
            )
        )


async def register_peer(bus: Bus, name: str, url: str) -> None:
    """What a node's agent records at start: the URL it serves at."""
    state = await bus.state(HOLDERS_BUCKET)
    await state.put(node_key(name), NodeRecord(node=name, url=url).model_dump_json().encode())


async def announce_peer(bus: Bus, name: str, url: str, closure: BuiltClosure) -> None:
    await register_peer(bus, name, url)
    for info in closure.infos.values():
        await bus.publish(
            PathAvailable(
                holder_kind="node",
                holder=name,
                holder_url=url,
                store_path=str(info.path),
                nar_hash=info.nar_hash.nix32,
                nar_size=info.nar_size,
            )
        )


async def want(
    bus: Bus,
    node: str,
    closure: BuiltClosure,
    within_s: float = 60,
    who: str = "t",
    **fields: str,
) -> None:
    """`node` wants `closure`; `fields`: more of the want's (binary_cache, ...)."""
    deadline = datetime.now(UTC) + timedelta(seconds=within_s)
    await bus.publish(
        PathWanted(
            node=node,
            store_paths=(str(closure.app),),
            deadline=deadline,
            requester=who,
            **fields,
        )
    )


def has_closure(agent: Agent, closure: BuiltClosure) -> bool:
    return all(p in agent.store for p in closure.paths)


async def verify_store(agent: Agent) -> None:
    """Contents match their NarHash and every path carries a signature by a trusted key."""
    keys = {"trusted-public-keys": agent.settings.trusted_public_keys}
    runner = NixRunner(store=agent.settings.store_root, options=keys)
    await runner.arun("nix", "store", "verify", "--all")


def rejected(node: str, holder: str, reason: str) -> float:
    labels = {"node": node, "holder": holder, "reason": reason}
    return REGISTRY.get_sample_value("niphas_mesh_rejected_total", labels) or 0.0


async def test_five_nodes_get_the_closure_from_peers_not_the_cache(
    bus: Bus,
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    seed(tmp_path / "nodes" / "n1", signed_cache, cache_key, [built_closure.app])
    async with counting_cache(signed_cache.dir) as (cache_url, served):
        await announce_cache(bus, cache_url, built_closure)
        nodes = [await start_node(f"n{i}") for i in range(1, 6)]
        for node in nodes:
            await ready(node)
        # n1 announced its holdings on start; the others see it before they want anything.
        await eventually(lambda: all(n.index.held_by(nodes[0].url) for n in nodes))
        for node in nodes[1:]:
            await want(bus, node.node, built_closure)
        await eventually(lambda: all(has_closure(n, built_closure) for n in nodes[1:]), 60)
        assert served.nar_bytes == 0
    wanted = {str(p) for p in built_closure.paths}
    for node in nodes[1:]:
        await verify_store(node)
    # Each node announced what it gained, with its own URL.
    await eventually(lambda: all(wanted <= n.index.held_by(n.url) for n in nodes))


async def test_hostile_peers_are_rejected_and_reported(
    bus: Bus,
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    expected = {
        "corrupt": {"hash"},
        "wrong-narhash": {"signature"},
        "stripped": {"signature"},
        "forged": {"signature"},
        "traversal": {"nar", "hash"},
        "symlink": {"nar", "hash"},
    }
    async with counting_cache(signed_cache.dir) as (cache_url, served):
        await announce_cache(bus, cache_url, built_closure)
        async with AsyncExitStack() as stack:
            for mode in expected:
                url = await stack.enter_async_context(hostile_peer(mode, signed_cache.dir, outside))
                await announce_peer(bus, f"evil-{mode}", url, built_closure)
            node = await start_node("victim")
            await ready(node)
            await want(bus, "victim", built_closure)
            await eventually(lambda: has_closure(node, built_closure), 60)
        # Every hostile peer was tried (peers come before the cache) and reported.
        for mode, reasons in expected.items():
            hits = {r for r in reasons if rejected("victim", f"evil-{mode}", r) > 0}
            assert hits, f"evil-{mode} was not reported"
        assert served.nar_bytes > 0  # the good copy came from the cache
    await verify_store(node)
    assert list(outside.iterdir()) == []


async def test_a_stalled_peer_is_abandoned(
    bus: Bus,
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    tmp_path: Path,
) -> None:
    assert "stall" in MODES
    async with (
        counting_cache(signed_cache.dir) as (cache_url, _),
        hostile_peer("stall", signed_cache.dir, tmp_path) as stall_url,
    ):
        await announce_cache(bus, cache_url, built_closure)
        await announce_peer(bus, "staller", stall_url, built_closure)
        node = await start_node("patient", stall_timeout_s=1.0)
        await ready(node)
        await want(bus, "patient", built_closure, within_s=60)
        await eventually(lambda: has_closure(node, built_closure), 60)
    assert rejected("patient", "staller", "stall") > 0
    await verify_store(node)


async def test_ten_concurrent_wants_make_one_download(
    bus: Bus,
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
) -> None:
    async with counting_cache(signed_cache.dir) as (cache_url, served):
        await announce_cache(bus, cache_url, built_closure)
        node = await start_node("busy", concurrency=16)
        await ready(node)
        for i in range(10):
            await want(bus, "busy", built_closure, who=f"csi:vol-{i}")
        await eventually(lambda: has_closure(node, built_closure), 60)
    assert node.fetcher.downloads == len(built_closure.paths)
    assert all(count == 1 for count in served.nar_requests.values())
    assert len(served.nar_requests) == len(built_closure.paths)


async def test_a_want_nobody_can_meet_fails_at_its_deadline(
    bus: Bus, start_node: StartNode, built_closure: BuiltClosure
) -> None:
    node = await start_node("lonely")
    await ready(node)
    await want(bus, "lonely", built_closure, within_s=2)

    def failed() -> bool:
        holdings = node.index.holdings(str(built_closure.app))
        return any(h.url == node.url and h.state == "failed" for h in holdings)

    await eventually(failed, 30)
    assert not has_closure(node, built_closure)
