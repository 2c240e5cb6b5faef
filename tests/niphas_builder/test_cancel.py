"""Superseded builds cancelled: with a build of an older commit running (real nix), a newer
push of the same ref that does not need its derivation cancels it (nix killed, nothing in the
store, the log ending `cancelled`, build.done failed saying so); a newer push that needs the
same derivation leaves it running, and so does `cancel_superseded` off."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from niphas_builder.settings import BuilderSettings
from niphas_common.bus.build_logs import log_reader
from niphas_common.bus.bus import Bus
from niphas_common.nix.runner import NixRunner
from niphas_schemas import BuildDone

from .conftest import BuildFlake
from .helpers import events, running_builder
from .test_supersede import NEW, OLD, lease_held

pytestmark = [pytest.mark.nix]


async def build_done(bus: Bus, count: int) -> dict[str, BuildDone]:
    for _ in range(1200):
        done = await events(bus, BuildDone)
        if len(done) >= count:
            return {d.commit: d for d in done}
        await asyncio.sleep(0.1)
    raise AssertionError("no build.done")


@pytest.fixture
def settings(builder_settings: BuilderSettings) -> BuilderSettings:
    return builder_settings.model_copy(update={"cancel_check_s": 0.2})


async def test_a_newer_push_cancels_the_running_build_it_does_not_need(
    bus: Bus,
    build_flake: Callable[..., BuildFlake],
    settings: BuilderSettings,
    nix_runner: NixRunner,
) -> None:
    old, new = build_flake(sleep=600), build_flake()  # the old build would outlast the test
    slow = old.attribute("slow")
    t0 = datetime.now(UTC)
    async with running_builder(bus, settings):
        await bus.publish(old.eval_done("slow", commit=OLD, occurred_at=t0))
        await lease_held(bus, slow.drv_path or "")
        await bus.publish(new.eval_done("app", commit=NEW, occurred_at=t0 + timedelta(seconds=1)))
        done = await build_done(bus, 2)
    cancelled = done[OLD]
    assert cancelled.status == "failed"
    assert cancelled.log_tail == f"superseded by {NEW}: cancelled while building"
    assert done[NEW].status == "built"
    assert nix_runner.path_info(slow.outputs.values()) == {}  # never finished
    text, end = await log_reader(bus).read(slow.drv_path or "")
    assert end == "cancelled" and "sleeping" in text


@pytest.mark.parametrize("newer_needs_it", [True, False], ids=["needed", "setting-off"])
async def test_a_build_still_needed_is_not_cancelled(
    bus: Bus,
    build_flake: Callable[..., BuildFlake],
    settings: BuilderSettings,
    newer_needs_it: bool,
) -> None:
    old, other = build_flake(sleep=3), build_flake()
    if not newer_needs_it:
        settings = settings.model_copy(update={"cancel_superseded": False})
    t0 = datetime.now(UTC)
    async with running_builder(bus, settings):
        await bus.publish(old.eval_done("slow", commit=OLD, occurred_at=t0))
        await lease_held(bus, old.attribute("slow").drv_path or "")
        newer = (old if newer_needs_it else other).eval_done(
            "slow" if newer_needs_it else "app",
            commit=NEW,
            push_event_id="push-2",
            occurred_at=t0 + timedelta(seconds=1),
        )
        await bus.publish(newer)
        done = await build_done(bus, 2)
    assert done[OLD].status == "built", done[OLD].log_tail
    assert done[NEW].status in ("built", "cached")
