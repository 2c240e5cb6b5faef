"""The bus on a 3-server JetStream cluster: every stream and state bucket has 3 replicas; a
client given every server's URL connects while one is down; a publish survives killing the
stream's leader and the consumer gets every event once; a cluster without quorum makes a
publish fail with an error naming the stream, and publishing works again, on the same
connection, once quorum returns; a server partitioned from the others loses its leadership
and catches up when healed."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.bus.connection import connect
from niphas_common.bus.consumer import Delivery, Subscription
from niphas_common.bus.publisher import PublishError
from niphas_common.bus.topology import ConsumerSpec, stream_configs
from niphas_common.nats_cluster import EmbeddedNatsCluster, get_json
from niphas_common.settings import NatsSettings
from niphas_schemas import PushReceived
from tests.helpers import eventually
from tests.nats_harness import serving_restarted

STREAM = "PUSH_RECEIVED"


def stored_on(cluster: EmbeddedNatsCluster, i: int, stream: str) -> int | None:
    """Messages in server i's own copy of `stream` (its monitoring endpoint, not the API,
    which the stream's leader answers)."""
    jsz = get_json(f"{cluster.servers[i].monitor_url}/jsz?accounts=true&streams=true") or {}
    for account in jsz.get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            if detail.get("name") == stream:
                messages: int = detail["state"]["messages"]
                return messages
    return None


async def publish_until_stored(bus: Bus, event: PushReceived) -> None:
    """Publish, retrying while the stream elects a leader (the Msg-Id makes a retry of a
    publish that was in fact stored a duplicate, not a second event)."""
    for _ in range(100):
        try:
            await bus.publish(event)
            return
        except PublishError:
            await asyncio.sleep(0.2)
    raise AssertionError(f"{event.msg_id} never stored")


async def test_streams_and_state_buckets_have_three_replicas(
    cluster_bus: Bus, cluster_settings: NatsSettings
) -> None:
    for config in stream_configs(cluster_settings):
        info = await cluster_bus.js.stream_info(config.name or "")
        assert info.config.num_replicas == 3, config.name
        assert info.cluster is not None and info.cluster.leader
        assert len(info.cluster.replicas or []) == 2, config.name  # the two followers
    state = await cluster_bus.state("test-holders")
    assert (await cluster_bus.js.stream_info(state.stream)).config.num_replicas == 3


async def test_a_server_list_with_one_server_down_connects_to_another(
    nats_cluster: EmbeddedNatsCluster,
) -> None:
    nats_cluster.kill(0)
    down = NatsSettings(url=nats_cluster.urls[0], connect_timeout_s=0.5)
    with pytest.raises(TimeoutError):  # alone, the dead server is retried for ever
        await asyncio.wait_for(connect(down, name="test"), 2)
    nc = await connect(NatsSettings(url=nats_cluster.url, connect_timeout_s=0.5), name="test")
    try:
        assert nc.is_connected
        assert nc.connected_url is not None
        assert nc.connected_url.port in (nats_cluster.servers[1].port, nats_cluster.servers[2].port)
    finally:
        await nc.close()


async def test_a_publish_survives_killing_the_stream_leader_and_each_event_is_consumed_once(
    cluster_bus: Bus, nats_cluster: EmbeddedNatsCluster, push_event: Callable[..., PushReceived]
) -> None:
    seen: Counter[str] = Counter()
    restarts: list[str] = []

    async def handle(event: PushReceived, delivery: Delivery) -> None:
        seen[event.delivery_id] += 1

    before = [push_event(f"before-{i}") for i in range(20)]
    after = [push_event(f"after-{i}") for i in range(20)]
    spec = ConsumerSpec(durable="test-cluster", subject="push.received", ack_wait_s=5)
    async with serving_restarted(cluster_bus, [Subscription(PushReceived, spec, handle)], restarts):
        for event in before:
            await cluster_bus.publish(event)
        await eventually(lambda: len(seen) == len(before))
        leader = nats_cluster.stream_leader(STREAM)
        assert leader is not None
        nats_cluster.kill(leader)
        for event in after:
            await publish_until_stored(cluster_bus, event)
        await eventually(lambda: len(seen) == len(before) + len(after), timeout_s=30)
        await asyncio.sleep(1)  # room for a redelivery, which must not come
    assert nats_cluster.stream_leader(STREAM) not in (None, leader)
    assert set(seen) == {e.delivery_id for e in before + after}
    assert set(seen.values()) == {1}
    # The consumer rides out the election (a fetch answered 503 is fetched again).
    assert restarts == [], restarts
    info = await cluster_bus.js.stream_info(STREAM)
    assert info.state.messages == len(before) + len(after)


async def test_without_quorum_a_publish_fails_naming_the_stream_then_recovers(
    cluster_bus: Bus, nats_cluster: EmbeddedNatsCluster, push_event: Callable[..., PushReceived]
) -> None:
    await cluster_bus.publish(push_event("with-quorum"))
    nats_cluster.kill(1)
    nats_cluster.kill(2)
    # Not a hang: the publish gives up by itself, long before this bound.
    with pytest.raises(PublishError, match=f"JetStream has no quorum/leader for stream {STREAM}"):
        await asyncio.wait_for(cluster_bus.publish(push_event("without-quorum")), 30)

    await asyncio.to_thread(nats_cluster.restart, 1)
    # The same bus, no reconnect asked for: publishing works again. (The refused publish may
    # be stored too, once the client's buffer reaches a server: its Msg-Id keeps it single.)
    back = push_event("quorum-back")
    await publish_until_stored(cluster_bus, back)
    assert (await cluster_bus.publish(back)).duplicate  # it is stored


@pytest.mark.skipif(os.geteuid() != 0, reason="a partition adds iptables rules (root)")
async def test_a_partitioned_leader_loses_its_stream_and_catches_up_when_healed(
    cluster_bus: Bus, nats_cluster: EmbeddedNatsCluster, push_event: Callable[..., PushReceived]
) -> None:
    await cluster_bus.publish(push_event("before"))
    leader = nats_cluster.stream_leader(STREAM)
    assert leader is not None
    others = ",".join(url for i, url in enumerate(nats_cluster.urls) if i != leader)
    isolated = await Bus.connect(
        NatsSettings(url=nats_cluster.urls[leader]), name="isolated", provision=False
    )
    majority = await Bus.connect(NatsSettings(url=others), name="majority", provision=False)
    try:
        with nats_cluster.partition(leader):
            await eventually(lambda: nats_cluster.stream_leader(STREAM) not in (None, leader))
            # The majority side takes publishes; the isolated server, still reachable by
            # clients, cannot store any.
            await publish_until_stored(majority, push_event("during"))
            with pytest.raises(PublishError, match="no quorum/leader"):
                await isolated.publish(push_event("isolated"))
            assert stored_on(nats_cluster, leader, STREAM) == 1
        # Healed: the server gets what was stored without it.
        await eventually(lambda: (stored_on(nats_cluster, leader, STREAM) or 0) >= 2, timeout_s=30)
        assert nats_cluster.stream_leader(STREAM) not in (None, leader)
    finally:
        await isolated.close()
        await majority.close()
