"""Full build logs: a real builder (real nix) keeps each build's whole log in the log stream,
readable while the build runs and after it ended; a failed build's log holds every line (not
only the event's tail); a log over its cap keeps its beginning and its end, saying how much
was left out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from niphas_builder.settings import BuilderSettings
from niphas_common.bus.build_logs import BuildLogs, LogChunk, UnknownLog, log_reader
from niphas_common.bus.bus import Bus
from niphas_schemas import BuildDone

from .conftest import BuildFlake
from .helpers import events, running_builder

pytestmark = [pytest.mark.nix]


async def build_done(bus: Bus, count: int) -> list[BuildDone]:
    for _ in range(1200):
        done = await events(bus, BuildDone)
        if len(done) >= count:
            return done
        await asyncio.sleep(0.1)
    raise AssertionError("no build.done")


async def follow_when_started(logs: BuildLogs, drv: str) -> list[LogChunk]:
    for _ in range(600):
        try:
            return [chunk async for chunk in logs.follow(drv)]
        except UnknownLog:
            await asyncio.sleep(0.05)
    raise AssertionError(f"no log of {drv}")


async def test_a_failed_build_keeps_its_whole_log(
    bus: Bus, build_flake: Callable[..., BuildFlake], builder_settings: BuilderSettings
) -> None:
    flake = build_flake()
    async with running_builder(bus, builder_settings):
        await bus.publish(flake.eval_done("fail"))
        [done] = await build_done(bus, 1)
    assert done.status == "failed"
    assert "log line 1\n" not in (done.log_tail or "")  # the event has only the tail...
    text, end = await log_reader(bus).read(done.drv_path)
    assert end == "failed"
    for n in (1, 50, 100):  # ...the log stream has it all
        assert f"log line {n}\n" in text
    assert "boom: the build broke" in text


async def test_a_running_build_is_followed_live(
    bus: Bus, build_flake: Callable[..., BuildFlake], builder_settings: BuilderSettings
) -> None:
    flake = build_flake(sleep=3)
    drv = flake.attribute("slow").drv_path or ""
    async with running_builder(bus, builder_settings):
        await bus.publish(flake.eval_done("slow"))
        chunks = await follow_when_started(log_reader(bus), drv)
        [done] = await build_done(bus, 1)
    assert done.status == "built"
    # "sleeping" came in a piece of its own, before the end: it was read while nix ran.
    early = [c for c in chunks if c.end is None and "sleeping" in c.text]
    assert early and chunks.index(early[0]) < len(chunks) - 1
    assert chunks[-1].end == "built"


async def test_a_log_over_its_cap_keeps_its_start_and_end(
    bus: Bus, build_flake: Callable[..., BuildFlake], builder_settings: BuilderSettings
) -> None:
    flake = build_flake()
    settings = builder_settings.model_copy(update={"log_max_bytes": 1024})
    async with running_builder(bus, settings):
        await bus.publish(flake.eval_done("fail"))
        [done] = await build_done(bus, 1)
    text, end = await log_reader(bus).read(done.drv_path)
    assert end == "failed"
    head, _, tail = text.partition(" bytes not kept (log capped at 1024) ...\n")
    assert tail, text
    assert len(head.encode()) <= 1024 + 40
    assert "boom: the build broke" in tail


async def test_a_log_stream_the_server_refuses_leaves_builds_working(
    bus: Bus,
    build_flake: Callable[..., BuildFlake],
    builder_settings: BuilderSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """More log storage than the server has (a small JetStream in a dev cluster): the builder
    says why once and builds, keeping the tail in build.done, instead of crash-looping."""
    too_big = builder_settings.model_copy(update={"logs_max_bytes": 1 << 60})
    flake = build_flake()
    async with running_builder(bus, too_big):
        await bus.publish(flake.eval_done("fail"))
        [done] = await build_done(bus, 1)
    assert done.status == "failed" and "boom: the build broke" in (done.log_tail or "")
    [line] = [r.getMessage() for r in caplog.records if "build logs off" in r.getMessage()]
    assert "NIPHAS_BUILDER_LOGS_MAX_BYTES" in line
    with pytest.raises(UnknownLog):
        await log_reader(bus).read(done.drv_path)
