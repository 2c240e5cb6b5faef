"""Supersede: with one build slot busy, a queued build of an older commit is answered
`failed` with "superseded by <newer commit>" once a newer commit of the same ref arrived,
while the newer commit's own build runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from nats.js.errors import NotFoundError

from niphas_builder.lease import BUCKET
from niphas_builder.settings import BuilderSettings
from niphas_common.bus.bus import Bus
from niphas_schemas import BuildDone

from .conftest import BuildFlake
from .helpers import events, running_builder

pytestmark = [pytest.mark.nix]

OLD, NEW = "0" * 40, "f" * 40


async def lease_held(bus: Bus, drv_path: str) -> None:
    key = drv_path.rsplit("/", 1)[1].split("-", 1)[0]
    for _ in range(300):
        try:
            await (await bus.js.key_value(BUCKET)).get(key)
            return
        except NotFoundError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"no build of {drv_path} started")


async def test_newer_commit_supersedes_queued_build(
    bus: Bus,
    build_flake: Callable[..., BuildFlake],
    builder_settings: BuilderSettings,
) -> None:
    settings = builder_settings.model_copy(update={"max_parallel_builds": 1})
    busy, old, new = build_flake(sleep=3), build_flake(), build_flake()
    t0 = datetime.now(UTC)
    async with running_builder(bus, settings):
        await bus.publish(busy.eval_done("slow", commit="9" * 40, ref=None, occurred_at=t0))
        await lease_held(bus, busy.attribute("slow").drv_path or "")
        # Queued behind the busy slot...
        await bus.publish(old.eval_done("app", commit=OLD, occurred_at=t0 + timedelta(seconds=1)))
        # ...when a newer commit of the same ref arrives.
        await bus.publish(new.eval_done("app", commit=NEW, occurred_at=t0 + timedelta(seconds=2)))
        for _ in range(600):
            done = await events(bus, BuildDone)
            if len(done) >= 3:
                break
            await asyncio.sleep(0.1)

    by_drv = {d.drv_path: d for d in done}
    assert len(done) == 3, [(d.attribute, d.commit[:2], d.status, d.log_tail) for d in done]
    assert by_drv[busy.attribute("slow").drv_path or ""].status == "built"
    superseded = by_drv[old.attribute("app").drv_path or ""]
    assert superseded.status == "failed" and superseded.log_tail == f"superseded by {NEW}"
    newer = by_drv[new.attribute("app").drv_path or ""]
    assert newer.status == "built" and newer.commit == NEW
