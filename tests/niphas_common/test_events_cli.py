"""`niphas events` against a real server, run as the installed console script: streams,
consumers, view (headers and pretty body) and tail, without touching durable consumers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.bus.topology import ConsumerSpec, ensure_consumer
from niphas_schemas import PushReceived

NIPHAS = shutil.which("niphas") or str(Path(sys.executable).with_name("niphas"))


def niphas(*args: str, nats_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NIPHAS, *args],
        env={**os.environ, "NATS_URL": nats_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def event() -> PushReceived:
    return PushReceived(
        forge="gitea",
        repository="https://forge.example.test/acme/app.git",
        ref="refs/heads/main",
        commit="89abcdef0123456789abcdef0123456789abcdef",
        pusher="alice",
        delivery_id="view-1",
    )


async def test_view_prints_headers_and_body(bus: Bus, event: PushReceived, nats_url: str) -> None:
    await bus.publish(event)
    result = await asyncio.to_thread(niphas, "events", "view", "push.received", nats_url=nats_url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"Nats-Msg-Id: {event.msg_id}" in out
    assert "traceparent: 00-" in out
    assert f"Niphas-Event-Id: {event.event_id}" in out
    assert "PUSH_RECEIVED #1" in out
    body = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert PushReceived.model_validate(body) == event


async def test_view_last_n_and_empty_and_unknown(
    bus: Bus, event: PushReceived, nats_url: str
) -> None:
    for i in range(5):
        await bus.publish(event.model_copy(update={"delivery_id": f"n-{i}"}))
    result = await asyncio.to_thread(
        niphas, "events", "view", "push.received", "-n", "2", nats_url=nats_url
    )
    assert result.returncode == 0, result.stderr
    assert '"delivery_id": "n-3"' in result.stdout
    assert '"delivery_id": "n-4"' in result.stdout
    assert "n-2" not in result.stdout

    empty = await asyncio.to_thread(niphas, "events", "view", "eval.done", nats_url=nats_url)
    assert empty.returncode == 0 and "no events on eval.done" in empty.stdout
    unknown = await asyncio.to_thread(niphas, "events", "view", "nope.x", nats_url=nats_url)
    assert unknown.returncode == 1
    assert "no stream holds subject 'nope.x'" in unknown.stderr


async def test_streams_and_consumers_tables(bus: Bus, event: PushReceived, nats_url: str) -> None:
    await bus.publish(event)
    await ensure_consumer(bus.js, ConsumerSpec(durable="eval-workers", subject="push.received"))
    streams = await asyncio.to_thread(niphas, "events", "streams", nats_url=nats_url)
    assert streams.returncode == 0, streams.stderr
    row = next(line for line in streams.stdout.splitlines() if "PUSH_RECEIVED" in line)
    assert "push.received" in row and " 1 " in row
    consumers = await asyncio.to_thread(
        niphas, "events", "consumers", "PUSH_RECEIVED", nats_url=nats_url
    )
    assert consumers.returncode == 0, consumers.stderr
    row = next(line for line in consumers.stdout.splitlines() if "eval-workers" in line)
    assert row.split("│")[3].strip() == "1"  # one event pending, untouched by viewing
    info = await bus.js.consumer_info("PUSH_RECEIVED", "eval-workers")
    assert info.num_pending == 1 and info.delivered.stream_seq == 0


async def test_tail_prints_new_events(bus: Bus, event: PushReceived, nats_url: str) -> None:
    await bus.publish(event.model_copy(update={"delivery_id": "old"}))
    proc = await asyncio.create_subprocess_exec(
        NIPHAS, "events", "tail", "push.received",
        env={**os.environ, "NATS_URL": nats_url},
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        # Publish until the tail (subscribing asynchronously) shows one: only new events appear.
        seen = ""
        for i in range(100):
            await bus.publish(event.model_copy(update={"delivery_id": f"new-{i}"}))
            try:
                seen += (await asyncio.wait_for(proc.stdout.readline(), 0.2)).decode()
            except TimeoutError:
                continue
            break
        seen += (await asyncio.wait_for(proc.stdout.readuntil(b"}\n"), 10)).decode()
    finally:
        proc.terminate()
        await proc.wait()
    assert "push.received" in seen
    assert '"delivery_id": "new-' in seen
    assert '"delivery_id": "old"' not in seen
