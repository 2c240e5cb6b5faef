"""State buckets on a real server: no age limit; a watch reads each key's last value (keys
deleted before it started stay unseen), says when it has caught up, then follows writes and
deletions in revision order; a listener hears only its keys; `create` never overwrites; an
event that states something is written to its bucket before it is published, and a
withdrawal deletes its key."""

from __future__ import annotations

import asyncio

from niphas_common.bus.bus import Bus
from niphas_common.bus.state import Entry
from niphas_schemas import HOLDERS_BUCKET, PathAvailable
from tests.helpers import eventually

PATH = "/nix/store/" + "a" * 32 + "-app"


async def test_a_watch_reads_last_values_then_follows(bus: Bus) -> None:
    state = await bus.state("test-state")
    info = await bus.js.stream_info(state.stream)
    assert info.config.max_age in (0, None)  # no age limit
    await state.put("a", b"1")
    await state.put("a", b"2")
    await state.put("gone", b"x")
    await state.delete("gone")
    assert await state.create("a", b"3") is None  # exists: not overwritten
    seen: list[Entry] = []

    async def on_entry(entry: Entry) -> None:
        seen.append(entry)

    watch = await state.watch(on_entry)
    try:
        await eventually(lambda: watch.caught_up)
        assert [(e.key, e.value) for e in seen] == [("a", b"2")]
        await state.put("b", b"4")
        await state.delete("a")
        await eventually(lambda: len(seen) == 3)
        assert [(e.key, e.value) for e in seen[1:]] == [("b", b"4"), ("a", None)]
        assert seen[1].revision < seen[2].revision
    finally:
        await watch.stop()


async def test_a_listener_hears_only_its_keys(bus: Bus) -> None:
    state = await bus.state("test-state")
    heard: list[Entry] = []
    done = asyncio.Event()

    async def on_entry(entry: Entry) -> None:
        heard.append(entry)
        done.set()

    listener = await state.listen(["mine.x"], on_entry)
    try:
        for i in range(10):
            await state.put(f"other.{i}", b"-")
        await state.put("mine.x", b"yes")
        await asyncio.wait_for(done.wait(), 5)
    finally:
        await listener.stop()
    assert [(e.key, e.value) for e in heard] == [("mine.x", b"yes")]


async def test_an_event_that_states_something_is_recorded_then_published(bus: Bus) -> None:
    said = PathAvailable(
        holder_kind="cache", holder="cache", holder_url="http://cache:8080",
        store_path=PATH, nar_hash="sha256:" + "0" * 52, nar_size=1,
    )  # fmt: skip
    await bus.publish(said)
    state = await bus.state(HOLDERS_BUCKET)
    entry = await state.get(said.state_key)
    assert entry is not None and PathAvailable.model_validate_json(entry.value or b"") == said
    await bus.publish(said.model_copy(update={"state": "withdrawn", "nar_hash": None}))
    assert await state.get(said.state_key) is None
    stored = await bus.js.stream_info("PATH_AVAILABLE")
    assert stored.state.messages == 2  # both events kept for inspection


async def test_a_deletion_marker_expires(bus: Bus) -> None:
    """Keys deleted over months must not pile up as markers that every new reader skips."""
    state = await bus.state("test-markers")
    await state.put("k", b"v")
    await state.delete("k", marker_ttl_s=1.0)
    assert await state.get("k") is None
    for _ in range(100):
        info = await bus.js.stream_info(state.stream)
        if info.state.messages == 0:
            break
        await asyncio.sleep(0.1)
    assert info.state.messages == 0
