"""Who holds what is state, not a log: with events kept for two seconds, a node that starts
after every `path.available` event expired still finds the peer that holds a path, and the
cache that holds a path pushed "last week"; holders announced in the old format (events only)
are carried into the state by the first upgraded agent; forged or malformed holder records
are skipped with a log line and never make a node fetch from an address that did not
announce itself; each node's want consumer takes only its own wants (50 nodes)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from niphas_common.bus.bus import Bus
from niphas_common.bus.codec import encode
from niphas_common.bus.topology import ConsumerSpec, ensure_consumer, stream_name
from niphas_common.settings import NatsSettings
from niphas_mesh.agent import want_consumer
from niphas_mesh.holder_state import FORMAT_KEY
from niphas_mesh.router import BusRouter
from niphas_schemas import HOLDERS_BUCKET, NodeRecord, PathAvailable, PathWanted
from niphas_schemas.holders import node_key
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready, seed
from tests.niphas_mesh.servers import counting_cache
from tests.niphas_mesh.test_fetch import has_closure, verify_store, want
from tests.nix_harness import BuiltClosure, CacheKey, FileCache

EVENT_AGE_S = 2.0
PATH = "/nix/store/" + "a" * 32 + "-app"
OTHER = "/nix/store/" + "b" * 32 + "-lib"
NAR_HASH = "sha256:" + "0" * 52


@pytest.fixture
def nats_settings(nats_url: str) -> NatsSettings:
    """Events expire after two seconds (every stream); state never does."""
    return NatsSettings(
        url=nats_url,
        connect_timeout_s=2.0,
        max_age_days=EVENT_AGE_S / 86400,
        duplicate_window_s=1.0,
    )


async def every_event_expired(bus: Bus) -> None:
    async def stored() -> int:
        info = await bus.js.stream_info(stream_name(PathAvailable.subject))
        return int(info.state.messages)

    assert await stored() > 0  # there were events to lose
    for _ in range(200):
        if await stored() == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("path.available still holds events")


def cache_said(url: str, closure: BuiltClosure, when: datetime) -> list[PathAvailable]:
    """What the builder published for the paths it pushed to the cache at `url`."""
    return [
        PathAvailable(
            holder_kind="cache",
            holder="cache",
            holder_url=url,
            store_path=str(info.path),
            nar_hash=info.nar_hash.nix32,
            nar_size=info.nar_size,
            references=tuple(str(r) for r in info.references),
            occurred_at=when,
        )
        for info in closure.infos.values()
    ]


@pytest.mark.nix
@pytest.mark.root
async def test_a_node_started_after_every_event_expired_fetches_from_a_peer(
    bus: Bus,
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    seed(tmp_path / "nodes" / "n1", signed_cache, cache_key, [built_closure.app])
    holder = await start_node("n1")
    await ready(holder)
    await every_event_expired(bus)
    # No cache anywhere: only n1 holds the closure, and its announcements are gone as events.
    joined = await start_node("n2")
    await ready(joined)
    assert joined.index.held_by(holder.url) == {str(p) for p in built_closure.paths}
    await want(bus, "n2", built_closure)
    await eventually(lambda: has_closure(joined, built_closure), 60)
    await verify_store(joined)


@pytest.mark.nix
@pytest.mark.root
async def test_a_rollback_to_a_path_built_last_week_works_on_a_node_that_joined_since(
    bus: Bus,
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
) -> None:
    async with counting_cache(signed_cache.dir) as (cache_url, served):
        for event in cache_said(cache_url, built_closure, datetime.now(UTC) - timedelta(days=7)):
            await bus.publish(event)  # as the builder does: state and event
        await every_event_expired(bus)
        joined = await start_node("n3")  # no fallback cache configured
        await ready(joined)
        await want(bus, "n3", built_closure)
        await eventually(lambda: has_closure(joined, built_closure), 60)
        assert served.nar_bytes > 0  # from the cache the state named
    await verify_store(joined)


@pytest.mark.nix
@pytest.mark.root
async def test_holders_in_the_old_format_are_carried_into_the_state(
    bus: Bus,
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
) -> None:
    """A cluster upgraded from the old format: its cache announcements exist only as
    events. The first agent of the new format copies them into the state once."""
    async with counting_cache(signed_cache.dir) as (cache_url, served):
        said = cache_said(cache_url, built_closure, datetime.now(UTC))
        for event in said:
            await bus.publish(event, record=False)  # what the old builder did
        state = await bus.state(HOLDERS_BUCKET)
        assert await state.get(said[0].state_key) is None
        node = await start_node("n4")
        await ready(node)
        assert await state.get(FORMAT_KEY) is not None
        for event in said:
            assert await state.get(event.state_key) is not None
        await want(bus, "n4", built_closure)
        await eventually(lambda: has_closure(node, built_closure), 60)
        assert served.nar_bytes > 0
    # Once is enough: a later agent does not read the old stream again.
    await state.delete(said[0].state_key)
    later = await start_node("n5")
    await ready(later)
    assert await state.get(said[0].state_key) is None


@pytest.mark.nix
@pytest.mark.root
async def test_a_forged_record_never_makes_a_node_fetch_from_its_address(
    bus: Bus,
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Records claim that a registered node and an unregistered one hold the closure at an
    address neither announced for itself; the node fetches from the real cache only."""
    state = await bus.state(HOLDERS_BUCKET)
    async with (
        counting_cache(signed_cache.dir) as (cache_url, from_cache),
        counting_cache(signed_cache.dir) as (evil_url, from_evil),
    ):
        n6 = NodeRecord(node="n6", url="http://127.0.0.1:9")  # n6 serves elsewhere
        await state.put(node_key("n6"), n6.model_dump_json().encode())
        for info in built_closure.infos.values():
            for name in ("n6", "ghost"):
                claim = PathAvailable(
                    holder_kind="node", holder=name, holder_url=evil_url,
                    store_path=str(info.path), nar_hash=info.nar_hash.nix32,
                    nar_size=info.nar_size,
                )  # fmt: skip
                await state.put(claim.state_key, encode(claim))
        for event in cache_said(cache_url, built_closure, datetime.now(UTC)):
            await bus.publish(event)
        node = await start_node("n7")
        await ready(node)
        assert node.index.holdings(str(built_closure.app))  # recorded...
        assert {h.url for h in node.index.available(str(built_closure.app))} == {cache_url}
        await want(bus, "n7", built_closure)
        await eventually(lambda: has_closure(node, built_closure), 60)
        assert from_evil.nar_requests == {}
        assert from_cache.nar_bytes > 0


def ignored(reason: str) -> float:
    return REGISTRY.get_sample_value("niphas_mesh_ignored_records_total", {"reason": reason}) or 0.0


async def test_malformed_holder_records_are_ignored_with_a_log_line(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    state = await bus.state(HOLDERS_BUCKET)
    real = PathAvailable(
        holder_kind="node", holder="n1", holder_url="http://n1:5480",
        store_path=PATH, nar_hash=NAR_HASH, nar_size=1,
    )  # fmt: skip
    other_path = real.model_copy(update={"store_path": OTHER})
    other_node = real.model_copy(update={"holder": "n2"})
    n1 = NodeRecord(node="n1", url="http://n1:5480").model_dump_json().encode()
    forged = {
        real.state_key.replace("n1", "n3"): encode(real),  # wrong node: says n1, filed as n3
        other_path.state_key.replace("b" * 32, "c" * 32): encode(other_path),  # unknown path
        "a" * 32 + ".node.n4": b"\x00 not json",  # garbage
        "a" * 32 + ".node.n5": b'{"schema_version": 1, "holder": "n5"}',  # not a record
        node_key("n2"): n1,  # n2's address, as stated by n1's record
        "elsewhere": b"x",  # not a holder key
    }
    before = {r: ignored(r) for r in ("garbage", "mismatch", "key")}
    await state.put(node_key("n1"), n1)
    await state.put(real.state_key, encode(real))
    await state.put(other_node.state_key, encode(other_node))
    with caplog.at_level(logging.WARNING, logger="niphas_mesh.holder_state"):
        for key, value in forged.items():
            await state.put(key, value)
        router = BusRouter(bus)
        await router.start()
        try:
            await eventually(lambda: router.caught_up)
            assert [h.holder for h in router.index.available(PATH)] == ["n1"]
            assert router.index.holdings(OTHER) == []
            assert router.index.node_url("n2") is None  # n2 never said where it serves
            assert {h.holder for h in router.index.holdings(PATH)} == {"n1", "n2"}
        finally:
            await router.stop()
    lines = [r.getMessage() for r in caplog.records if "ignoring holder record" in r.getMessage()]
    assert sorted(line.split()[3].rstrip(":") for line in lines) == sorted(forged)
    assert ignored("garbage") - before["garbage"] == 2
    assert ignored("mismatch") - before["mismatch"] == 3
    assert ignored("key") - before["key"] == 1


async def test_each_of_50_nodes_consumes_only_its_own_wants(bus: Bus) -> None:
    nodes = [f"node-{i}.zone-a" for i in range(50)]
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    for i, node in enumerate(nodes):
        for k in range(1 + i % 3):
            path = f"/nix/store/{str(i % 10) * 32}-app-{k}"
            await bus.publish(
                PathWanted(node=node, store_paths=(path,), deadline=deadline, requester=f"t{k}")
            )
    for i, node in enumerate(nodes):
        spec = want_consumer(node)
        await ensure_consumer(bus.js, spec)
        info = await bus.js.consumer_info(spec.stream, spec.durable)
        assert info.num_pending == 1 + i % 3, node
    spec = want_consumer(nodes[7])
    sub = await bus.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
    msgs = await sub.fetch(100, timeout=1.0)
    got = [PathWanted.model_validate_json(m.data) for m in msgs]
    assert [w.node for w in got] == [nodes[7]] * 2
    assert {m.subject for m in msgs} == {f"path.wanted.{nodes[7]}"}
    await sub.unsubscribe()


async def test_an_old_want_consumer_is_moved_to_its_node_subject(bus: Bus) -> None:
    """Upgrade: the consumer an earlier agent left (every node's wants) takes only its node's
    once the upgraded agent provisions it, keeping its name."""
    spec = want_consumer("n1")
    old = ConsumerSpec(spec.durable, PathWanted.subject)
    await ensure_consumer(bus.js, old)
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    await ensure_consumer(bus.js, spec)
    for node in ("n1", "n2"):
        want = PathWanted(node=node, store_paths=(PATH,), deadline=deadline, requester="t")
        await bus.publish(want)
    info = await bus.js.consumer_info(spec.stream, spec.durable)
    assert info.config.filter_subject == "path.wanted.n1"
    assert info.num_pending == 1


@pytest.mark.nix
@pytest.mark.root
async def test_the_records_of_a_node_gone_for_good_are_deleted(
    bus: Bus, start_node: StartNode
) -> None:
    """A node that stopped long ago, and one that never said where it serves, lose their
    records to the first serving node's sweep; a node that stopped just now keeps them."""
    state = await bus.state(HOLDERS_BUCKET)
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    records = {}
    for node, stopped in (("left", long_ago), ("ghost", None), ("resting", datetime.now(UTC))):
        said = PathAvailable(
            holder_kind="node", holder=node, holder_url=f"http://{node}:8080", store_path=PATH,
            nar_hash=NAR_HASH, nar_size=1, occurred_at=long_ago,
        )  # fmt: skip
        records[node] = said.state_key
        await state.put(said.state_key, encode(said))
        if stopped is not None:
            record = NodeRecord(node=node, url=said.holder_url, serving=False, at=stopped)
            await state.put(node_key(node), record.model_dump_json().encode())
    sweeper = await start_node("a-sweeper", departed_after_s=600.0)
    await ready(sweeper)

    async def present(node: str) -> bool:
        return await state.get(records[node]) is not None

    for _ in range(100):
        if not await present("left") and not await present("ghost"):
            break
        await asyncio.sleep(0.1)
    assert not await present("left")
    assert not await present("ghost")
    assert await present("resting")
