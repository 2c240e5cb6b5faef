"""Missing paths: the driver publishes `path.wanted.<node>` and waits for its node's holder
records of the asked paths (and only those). With the real mesh agent on the node the publish
completes; with a stand-in that reports a failure the publish fails with the mesh's reason
(another volume's failure does not fail it); with nobody answering it fails at the deadline,
leaving nothing mounted, leased or recorded; a driver whose bus is still connecting waits for
it within the same deadline, and names it when it never connects. The workload's binary cache
attributes ride in the want; the real agent fetches from a cache it allows, and a cache it does
not allow fails the mount with the reason."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from nats.js.api import DeliverPolicy

from niphas_common.bus.bus import Bus
from niphas_common.bus.codec import decode
from niphas_common.nix.runner import NixRunner
from niphas_common.settings import NatsSettings
from niphas_csi import mounts
from niphas_csi.wants import PathWants
from niphas_schemas import PathAvailable, PathWanted
from tests.nix_harness import BuiltClosure, CacheKey, FileCache

from .conftest import NODE_ID, Driver, Node, driver_settings

pytestmark = [pytest.mark.root, pytest.mark.nix]


@pytest.fixture
async def wanted(bus: Bus) -> AsyncIterator[list[PathWanted]]:
    """Every path.wanted published from now on."""
    seen: list[PathWanted] = []

    async def on_message(msg: Any) -> None:
        seen.append(decode(PathWanted, msg.data))

    sub = await bus.js.subscribe(
        PathWanted.subject + ".>",
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
        cb=on_message,
    )
    try:
        yield seen
    finally:
        await sub.unsubscribe()


async def start_driver(node: Node, nats: NatsSettings, **overrides: object) -> Driver:
    driver = Driver(driver_settings(node, **overrides), nats)
    await driver.start()
    return driver


def assert_nothing_left(node: Node, volume_id: str, target: Path) -> None:
    assert not target.exists()
    assert not node.lease_dir(volume_id).exists()
    assert not (node.state_dir / "csi" / "volumes" / f"{volume_id}.json").exists()
    assert not [m for m in mounts.mounts() if m.mount_point.startswith(str(node.state_dir))
                and m.source == "niphas-csi"]  # fmt: skip


async def test_a_bus_that_never_connects_is_a_deadline_naming_it(
    bare_node: Node, built_closure: BuiltClosure
) -> None:
    nowhere = NatsSettings(url="nats://127.0.0.1:1", connect_timeout_s=0.2)
    driver = await start_driver(bare_node, nowhere, fetch_timeout_s=1.0)
    try:
        target = bare_node.target()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await driver.publish("csi-nobus", target, str(built_closure.app))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "the bus to ask the mesh did not connect" in (err.value.details() or "")
        assert str(built_closure.app) in (err.value.details() or "")
        assert_nothing_left(bare_node, "csi-nobus", target)
    finally:
        await driver.stop()


async def test_nobody_answers_deadline_exceeded_and_nothing_left(
    bare_node: Node,
    nats_settings: NatsSettings,
    built_closure: BuiltClosure,
    wanted: list[PathWanted],
) -> None:
    driver = await start_driver(bare_node, nats_settings, fetch_timeout_s=1.5)
    try:
        target = bare_node.target()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await driver.publish("csi-late", target, str(built_closure.app))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert str(built_closure.app) in (err.value.details() or "")
        assert_nothing_left(bare_node, "csi-late", target)
        [want] = wanted
        assert want.node == NODE_ID
        assert want.store_paths == (str(built_closure.app),)
        assert want.requester == "csi:csi-late"
    finally:
        await driver.stop()


async def test_the_workload_cache_attributes_ride_in_the_want(
    bare_node: Node,
    nats_settings: NatsSettings,
    built_closure: BuiltClosure,
    wanted: list[PathWanted],
    cache_key: CacheKey,
) -> None:
    driver = await start_driver(bare_node, nats_settings, fetch_timeout_s=1.5)
    attributes = {
        "binaryCache": "https://cache.example/team",
        "binaryCachePublicKey": str(cache_key.public),
    }
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await driver.publish(
                "csi-own", bare_node.target(), str(built_closure.app), extra=attributes
            )
        [want] = wanted
        assert want.binary_cache == "https://cache.example/team"
        assert want.binary_cache_public_key == str(cache_key.public)
        assert want.store_paths == (str(built_closure.app),)
    finally:
        await driver.stop()


async def test_a_reported_failure_fails_the_publish_with_its_reason(
    bare_node: Node, nats_settings: NatsSettings, built_closure: BuiltClosure, bus: Bus
) -> None:
    async def refuse(msg: Any) -> None:
        want = decode(PathWanted, msg.data)
        for path in want.store_paths:
            await bus.publish(
                PathAvailable(
                    holder_kind="node", holder=want.node, holder_url="http://127.0.0.1:9",
                    state="failed", store_path=path,
                    error=f"{want.requester}: no peer and no cache has it",
                )
            )  # fmt: skip

    sub = await bus.js.subscribe(PathWanted.subject + ".>", ordered_consumer=True, cb=refuse)
    driver = await start_driver(bare_node, nats_settings)
    try:
        target = bare_node.target()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await driver.publish("csi-refused", target, str(built_closure.app))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no peer and no cache has it" in (err.value.details() or "")
        assert_nothing_left(bare_node, "csi-refused", target)
    finally:
        await driver.stop()
        await sub.unsubscribe()


async def test_stand_in_mesh_fetches_and_the_publish_completes(
    bare_node: Node,
    nats_settings: NatsSettings,
    built_closure: BuiltClosure,
    bus: Bus,
    signed_cache: FileCache,
    cache_key: CacheKey,
) -> None:
    """A narrow stand-in for the mesh agent: copy from the cache, announce available."""
    runner = NixRunner(
        store=str(bare_node.store_root), options={"trusted-public-keys": str(cache_key.public)}
    )

    async def fetch(msg: Any) -> None:
        want = decode(PathWanted, msg.data)
        for path in want.store_paths:  # another volume's want failed: not this one's answer
            await bus.publish(
                PathAvailable(
                    holder_kind="node", holder=want.node, holder_url="http://127.0.0.1:9",
                    state="failed", store_path=path, error="csi:other: refused",
                )
            )  # fmt: skip
        await runner.acopy(want.store_paths, src=signed_cache.url)
        for path in want.store_paths:
            info = built_closure.infos[path]
            await bus.publish(
                PathAvailable(
                    holder_kind="node", holder=want.node, holder_url="http://127.0.0.1:9",
                    store_path=path, nar_hash=str(info.nar_hash), nar_size=info.nar_size,
                )
            )  # fmt: skip

    sub = await bus.js.subscribe(PathWanted.subject + ".>", ordered_consumer=True, cb=fetch)
    driver = await start_driver(bare_node, nats_settings)
    try:
        target = bare_node.target()
        await driver.publish("csi-fetched", target, str(built_closure.app))
        assert set(os.listdir(target)) == {p.base_name for p in built_closure.paths}
    finally:
        await driver.stop()
        await sub.unsubscribe()


async def test_real_mesh_agent_fetches_and_the_publish_completes(
    bare_node: Node,
    nats_settings: NatsSettings,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    from niphas_mesh.agent import start_agent
    from niphas_mesh.settings import MeshSettings

    mesh_settings = MeshSettings(
        node=NODE_ID,
        listen="127.0.0.1:0",
        store_root=str(bare_node.store_root),
        state_dir=tmp_path / "mesh-state",
        trusted_public_keys=str(cache_key.public),
        fallback_caches=signed_cache.url,
        gc_high_percent=100.0,
        gc_interval_s=3600.0,
        rescan_interval_s=3600.0,
    )
    agent = await start_agent(mesh_settings, nats_settings)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    driver = await start_driver(bare_node, nats_settings)
    try:
        target = bare_node.target()
        await driver.publish("csi-mesh", target, str(built_closure.app), rpc_timeout_s=60)
        assert set(os.listdir(target)) == {p.base_name for p in built_closure.paths}
        program = target / built_closure.app.base_name / "bin" / "demo"
        assert program.exists()
        await driver.unpublish("csi-mesh", target)
    finally:
        await driver.stop()
        stop.set()
        try:
            await asyncio.wait_for(task, 30)
        finally:
            await agent.close()


async def test_the_driver_hears_only_the_paths_it_asked_for_on_its_node(bus: Bus) -> None:
    """While the driver waits for one path, the rest of the cluster announces: other nodes
    about that path, this node about other paths. It receives none of it; the answer it waits
    for ends the wait; the want went to this node's subject."""
    asked = "/nix/store/" + "a" * 32 + "-app"
    other = "/nix/store/" + "b" * 32 + "-lib"
    wants = PathWants(bus, NODE_ID)
    await wants.start()
    published = asyncio.Event()
    subjects: list[str] = []

    async def on_want(msg: Any) -> None:
        subjects.append(msg.subject)
        published.set()

    sub = await bus.nc.subscribe(PathWanted.subject + ".>", cb=on_want)

    def said(node: str, path: str) -> PathAvailable:
        return PathAvailable(
            holder_kind="node", holder=node, holder_url=f"http://{node}:5480",
            store_path=path, nar_hash="sha256:" + "0" * 52, nar_size=1,
        )  # fmt: skip

    async def nothing_missing_yet(paths: Sequence[str]) -> Sequence[str]:
        return paths

    waiting = asyncio.create_task(
        wants.fetch([asked], "csi:v1", 60.0, nothing_missing_yet, recheck_s=60.0)
    )
    try:
        await asyncio.wait_for(published.wait(), 10)
        for i in range(20):
            await bus.publish(said(f"peer-{i}", asked))
            await bus.publish(said(NODE_ID, f"/nix/store/{str(i % 10) * 32}-other-{i}"))
        await bus.publish(said(NODE_ID, other))
        assert not waiting.done()
        await bus.publish(said(NODE_ID, asked))
        await asyncio.wait_for(waiting, 10)
    finally:
        waiting.cancel()
        await sub.unsubscribe()
        await wants.stop()
    assert wants.heard == 1
    assert subjects == [f"path.wanted.{NODE_ID}"]


async def test_real_mesh_agent_fetches_from_the_workload_cache_it_allows_and_no_other(
    bare_node: Node,
    nats_settings: NatsSettings,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    from niphas_mesh.agent import start_agent
    from niphas_mesh.settings import MeshSettings
    from tests.niphas_mesh.servers import counting_cache

    async with counting_cache(signed_cache.dir) as (url, served):
        mesh_settings = MeshSettings(
            node=NODE_ID,
            listen="127.0.0.1:0",
            store_root=str(bare_node.store_root),
            state_dir=tmp_path / "mesh-state",
            trusted_public_keys=str(cache_key.public),
            workload_caches=f"{url}/",  # no fallback cache: only the workload's has the closure
            gc_high_percent=100.0,
            gc_interval_s=3600.0,
            rescan_interval_s=3600.0,
        )
        agent = await start_agent(mesh_settings, nats_settings)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        driver = await start_driver(bare_node, nats_settings)
        try:
            refused = bare_node.target("refused")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await driver.publish(
                    "csi-refused", refused, str(built_closure.app),
                    extra={"binaryCache": "https://elsewhere.example"}, rpc_timeout_s=60,
                )  # fmt: skip
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            details = err.value.details() or ""
            assert (
                "binary cache https://elsewhere.example is not in NIPHAS_MESH_WORKLOAD_CACHES"
                in details
            )
            assert_nothing_left(bare_node, "csi-refused", refused)
            assert served.requests == 0
            target = bare_node.target("own")
            await driver.publish(
                "csi-own", target, str(built_closure.app),
                extra={"binaryCache": url, "binaryCachePublicKey": str(cache_key.public)},
                rpc_timeout_s=60,
            )  # fmt: skip
            assert set(os.listdir(target)) == {p.base_name for p in built_closure.paths}
            assert len(served.nar_requests) == len(built_closure.paths)
            await driver.unpublish("csi-own", target)
        finally:
            await driver.stop()
            stop.set()
            try:
                await asyncio.wait_for(task, 30)
            finally:
                await agent.close()
