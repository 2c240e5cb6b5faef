"""The JetStream spine against a real nats-server: idempotent publish, redelivery after a
consumer is SIGKILLed, poison messages terminated and recorded, transient failures retried
with backoff, in-progress acks for long handlers, graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from niphas_common.bus import inspect
from niphas_common.bus.bus import Bus
from niphas_common.bus.consumer import Delivery, Subscription
from niphas_common.bus.dead_letters import HEADER_DELIVERIES, HEADER_REASON, HEADER_SEQUENCE
from niphas_common.bus.pull import Pull
from niphas_common.bus.topology import DEAD_LETTER_STREAM, ConsumerSpec, ensure_consumer
from niphas_common.errors import PermanentError, TransientError
from niphas_schemas import PushReceived
from tests.helpers import eventually, serving

WORKER = Path(__file__).with_name("worker_proc.py")


async def test_same_idempotency_key_is_stored_once(
    bus: Bus, push_event: Callable[..., PushReceived]
) -> None:
    first = push_event("delivery-42")
    again = push_event("delivery-42")  # a forge redelivery: new event id, same delivery id
    assert first.event_id != again.event_id

    ack1 = await bus.publish(first)
    ack2 = await bus.publish(again)
    other = await bus.publish(push_event("delivery-43"))

    assert not ack1.duplicate
    assert ack2.duplicate
    assert ack2.seq == ack1.seq
    assert other.seq == ack1.seq + 1
    info = await bus.js.stream_info("PUSH_RECEIVED")
    assert info.state.messages == 2


async def test_sigkilled_consumer_event_is_redelivered_to_next_instance(
    bus: Bus, push_event: Callable[..., PushReceived], nats_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "received"
    env = {**os.environ, "NATS_URL": nats_url, "TEST_ACK_WAIT_S": "1.5"}
    proc = subprocess.Popen([sys.executable, str(WORKER), "hang", str(marker)], env=env)
    try:
        event = push_event("delivery-kill")
        await bus.publish(event)
        await eventually(marker.exists)
        assert marker.read_text().split() == [event.event_id, "1"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    seen: list[tuple[str, int]] = []

    async def handle(ev: PushReceived, delivery: Delivery) -> None:
        seen.append((ev.event_id, delivery.num_delivered))

    spec = ConsumerSpec(durable="test-worker", subject="push.received", ack_wait_s=1.5)
    async with serving(bus, [Subscription(PushReceived, spec, handle)]):
        await eventually(lambda: bool(seen))
    assert seen == [(event.event_id, 2)]
    info = await bus.js.consumer_info("PUSH_RECEIVED", "test-worker")
    assert info.num_pending == 0
    assert info.num_ack_pending == 0


async def test_poison_messages_are_terminated_once_and_recorded(
    bus: Bus, push_event: Callable[..., PushReceived]
) -> None:
    await bus.js.publish("push.received", b"{not json", headers={"Nats-Msg-Id": "bad-1"})
    future = json.loads(push_event("delivery-future").model_dump_json())
    future["schema_version"] = 99
    await bus.js.publish(
        "push.received", json.dumps(future).encode(), headers={"Nats-Msg-Id": "bad-2"}
    )
    wrong = json.loads(push_event("delivery-wrong").model_dump_json())
    wrong["repository"] = 42
    await bus.js.publish(
        "push.received", json.dumps(wrong).encode(), headers={"Nats-Msg-Id": "bad-3"}
    )
    good = push_event("delivery-good")
    await bus.publish(good)

    handled: list[str] = []

    async def handle(ev: PushReceived, delivery: Delivery) -> None:
        handled.append(ev.delivery_id)

    spec = ConsumerSpec(durable="poison-test", subject="push.received", ack_wait_s=0.5)
    async with serving(bus, [Subscription(PushReceived, spec, handle)]):
        await eventually(lambda: handled == ["delivery-good"])

        async def dead_count() -> int:
            return (await bus.js.stream_info(DEAD_LETTER_STREAM)).state.messages

        deadline = time.monotonic() + 10
        while await dead_count() < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Several ack-wait periods pass: a terminated message must not come back.
        await asyncio.sleep(1.5)

    assert handled == ["delivery-good"]
    info = await bus.js.consumer_info("PUSH_RECEIVED", "poison-test")
    assert info.num_redelivered == 0
    assert info.num_ack_pending == 0
    assert info.num_pending == 0

    dead = await inspect.view(bus.js, "dead.push.received", last=10)
    assert [int(m.headers[HEADER_SEQUENCE]) for m in dead] == [1, 2, 3]
    assert all(m.headers[HEADER_DELIVERIES] == "1" for m in dead)
    reasons = [m.headers[HEADER_REASON] for m in dead]
    assert "not JSON" in reasons[0]
    assert "unknown schema_version 99" in reasons[1]
    assert "repository" in reasons[2]
    assert dead[0].data == b"{not json"  # kept byte for byte


async def test_handler_permanent_error_goes_to_dead_letters(
    bus: Bus, push_event: Callable[..., PushReceived]
) -> None:
    calls = 0

    async def handle(ev: PushReceived, delivery: Delivery) -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("flake ref not allowed")

    await bus.publish(push_event("delivery-denied"))
    spec = ConsumerSpec(durable="permanent-test", subject="push.received", ack_wait_s=0.5)
    async with serving(bus, [Subscription(PushReceived, spec, handle)]):
        await eventually(lambda: calls == 1)
        await asyncio.sleep(1.2)
    assert calls == 1
    dead = await inspect.view(bus.js, "dead.>", last=5)
    assert [m.headers[HEADER_REASON] for m in dead] == ["flake ref not allowed"]


async def test_transient_failure_is_retried_with_backoff_then_succeeds(
    bus: Bus, push_event: Callable[..., PushReceived]
) -> None:
    attempts: list[tuple[int, float]] = []

    async def handle(ev: PushReceived, delivery: Delivery) -> None:
        attempts.append((delivery.num_delivered, time.monotonic()))
        if len(attempts) < 3:
            raise TransientError("cache unreachable")

    backoff = (0.3, 0.6)
    spec = ConsumerSpec(
        durable="retry-test", subject="push.received", ack_wait_s=5, backoff_s=backoff
    )
    await bus.publish(push_event("delivery-flaky"))
    async with serving(bus, [Subscription(PushReceived, spec, handle)]):
        await eventually(lambda: len(attempts) == 3)
    assert [n for n, _ in attempts] == [1, 2, 3]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(attempts)]
    # The server holds a nak'ed message for at least the delay we asked for.
    assert gaps[0] >= backoff[0] * 0.9
    assert gaps[1] >= backoff[1] * 0.9
    info = await bus.js.consumer_info("PUSH_RECEIVED", "retry-test")
    assert info.num_ack_pending == 0
    assert info.num_pending == 0
    assert (await bus.js.stream_info(DEAD_LETTER_STREAM)).state.messages == 0


async def test_redelivery_is_bounded_then_recorded(
    bus: Bus, push_event: Callable[..., PushReceived]
) -> None:
    attempts: list[int] = []

    async def handle(ev: PushReceived, delivery: Delivery) -> None:
        attempts.append(delivery.num_delivered)
        raise RuntimeError("always broken")

    spec = ConsumerSpec(
        durable="bounded-test",
        subject="push.received",
        ack_wait_s=5,
        max_deliver=3,
        backoff_s=(0.05,),
    )
    await bus.publish(push_event("delivery-broken"))
    async with serving(bus, [Subscription(PushReceived, spec, handle)]):
        await eventually(lambda: len(attempts) == 3)
        await asyncio.sleep(0.5)
    assert attempts == [1, 2, 3]
    dead = await inspect.view(bus.js, "dead.push.received", last=5)
    assert len(dead) == 1
    assert "gave up after 3 deliveries" in dead[0].headers[HEADER_REASON]
    assert "always broken" in dead[0].headers[HEADER_REASON]


async def test_long_handler_is_kept_alive_with_in_progress_acks(
    bus: Bus, push_event: Callable[..., PushReceived]
) -> None:
    deliveries: list[int] = []

    async def handle(ev: PushReceived, delivery: Delivery) -> None:
        deliveries.append(delivery.num_delivered)
        await asyncio.sleep(2.5)  # five times the ack wait

    spec = ConsumerSpec(durable="slow-test", subject="push.received", ack_wait_s=0.5)
    await bus.publish(push_event("delivery-slow"))
    async with serving(bus, [Subscription(PushReceived, spec, handle)]):
        await eventually(lambda: bool(deliveries))
        await asyncio.sleep(3.0)
    assert deliveries == [1]
    info = await bus.js.consumer_info("PUSH_RECEIVED", "slow-test")
    assert info.num_redelivered == 0
    assert info.num_ack_pending == 0


async def test_sigterm_drains_in_flight_event_before_exit(
    bus: Bus, push_event: Callable[..., PushReceived], nats_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "progress"
    env = {**os.environ, "NATS_URL": nats_url, "TEST_ACK_WAIT_S": "30"}
    proc = subprocess.Popen([sys.executable, str(WORKER), "slow", str(marker)], env=env)
    try:
        event = push_event("delivery-drain")
        await bus.publish(event)
        await eventually(lambda: marker.exists() and "started" in marker.read_text())
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    assert f"done {event.event_id}" in marker.read_text()
    # Acked before exit: nothing pending, and with ack_wait 30 s a missing ack would show here.
    await ensure_consumer(
        bus.js, ConsumerSpec(durable="test-worker", subject="push.received", ack_wait_s=30)
    )
    info = await bus.js.consumer_info("PUSH_RECEIVED", "test-worker")
    assert info.num_ack_pending == 0
    assert info.num_pending == 0


async def test_provisioning_is_idempotent_and_applies_changed_settings(bus: Bus) -> None:
    from niphas_common.bus.topology import ensure_streams

    await ensure_streams(bus.js, bus.settings)
    await ensure_streams(bus.js, bus.settings)  # again: no error, nothing duplicated
    assert len(await inspect.streams(bus.js)) == 7  # one per subject, and dead letters

    # push.received remembers webhook deliveries for days (a late redelivery of an old push is
    # a duplicate, not a new push); the other streams use the common window.
    info = await bus.js.stream_info("PUSH_RECEIVED")
    assert info.config.duplicate_window == bus.settings.push_duplicate_window_s == 7 * 86400.0
    wider = bus.settings.model_copy(update={"duplicate_window_s": 1800.0})
    await ensure_streams(bus.js, wider)
    info = await bus.js.stream_info("EVAL_DONE")
    assert info.config.duplicate_window == 1800.0
    shorter = wider.model_copy(update={"push_duplicate_window_s": 3600.0, "max_age_days": 0.02})
    await ensure_streams(bus.js, shorter)
    info = await bus.js.stream_info("PUSH_RECEIVED")
    assert info.config.duplicate_window == 0.02 * 86400.0  # never beyond the max age

    spec = ConsumerSpec(durable="idem", subject="push.received", ack_wait_s=10)
    await ensure_consumer(bus.js, spec)
    await ensure_consumer(bus.js, spec)
    await ensure_consumer(
        bus.js, ConsumerSpec(durable="idem", subject="push.received", ack_wait_s=20)
    )
    assert (await bus.js.consumer_info("PUSH_RECEIVED", "idem")).config.ack_wait == 20.0


async def test_a_busy_consumer_fetches_in_batches_and_handles_each_event_once(
    bus: Bus, push_event: Callable[..., PushReceived], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []
    request = Pull.request

    async def counting(self: Pull, batch: int, expires_s: float) -> None:
        asked.append(batch)
        await request(self, batch, expires_s)

    monkeypatch.setattr(Pull, "request", counting)
    n = 300
    await bus.publisher.publish_many(push_event(f"backlog-{i}") for i in range(n))
    handled: list[str] = []

    async def handle(ev: PushReceived, delivery: Delivery) -> None:
        # Handlers that finish at different times: slots free one by one.
        await asyncio.sleep(0.001 * (int(ev.delivery_id.rsplit("-", 1)[1]) % 5))
        handled.append(ev.delivery_id)

    spec = ConsumerSpec(durable="batch-test", subject="push.received")
    async with serving(bus, [Subscription(PushReceived, spec, handle, concurrency=16)]):
        await eventually(lambda: len(handled) == n, timeout_s=60)

    assert sorted(handled) == sorted(f"backlog-{i}" for i in range(n))
    # A fetch for a quarter of the slots at least (4 of 16), not one per finished handler.
    assert min(asked) >= 4, asked


async def test_handlers_that_await_run_at_once_up_to_the_concurrency(
    bus: Bus, push_event: Callable[..., PushReceived]
) -> None:
    # Each handler waits until all of them are running: one fetched batch, handled by workers
    # one message after another, must still start every handler before any finishes.
    concurrency = 8
    await bus.publisher.publish_many(push_event(f"together-{i}") for i in range(concurrency))
    running: set[str] = set()
    all_running = asyncio.Event()
    most = 0
    handled: list[str] = []

    async def handle(ev: PushReceived, delivery: Delivery) -> None:
        nonlocal most
        running.add(ev.delivery_id)
        most = max(most, len(running))
        if len(running) == concurrency:
            all_running.set()
        await all_running.wait()
        handled.append(ev.delivery_id)

    spec = ConsumerSpec(durable="together-test", subject="push.received")
    sub = Subscription(PushReceived, spec, handle, concurrency=concurrency)
    async with serving(bus, [sub]):
        await eventually(lambda: len(handled) == concurrency, timeout_s=30)
    assert most == concurrency
    assert sorted(handled) == sorted(f"together-{i}" for i in range(concurrency))
