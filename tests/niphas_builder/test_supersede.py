"""Supersede: with one build slot busy, a queued build of an older commit is answered
`failed` with "superseded by <newer commit>" once a newer commit of the same ref arrived,
while the newer commit's own build runs. Newer means pushed later, not evaluated later: a ref
fast-forwarded to a commit evaluated long ago is answered at once, before the push it follows."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from nats.js.errors import NotFoundError

from niphas_builder import supersede
from niphas_builder.settings import BuilderSettings
from niphas_builder.single_flight import BUCKET
from niphas_common.bus.bus import Bus
from niphas_schemas import BuildDone, EvalDone

from .conftest import REPO, BuildFlake
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


async def test_the_head_of_a_ref_is_its_latest_push_not_its_latest_evaluation(bus: Bus) -> None:
    kv = await bus.key_value(supersede.BUCKET, ttl_s=supersede.TTL_S, description="heads")
    heads = supersede.RefHeads(kv)
    t0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

    def evaluated(commit: str, pushed_s: int, done_s: int) -> EvalDone:
        return EvalDone(
            push_event_id=f"push-{commit[:4]}",
            repository=REPO,
            ref="refs/heads/main",
            commit=commit,
            pushed_at=t0 + timedelta(seconds=pushed_s),
            occurred_at=t0 + timedelta(seconds=done_s),
            status="succeeded",
        )

    # main: OLD pushed, then fast-forwarded to NEW, a commit evaluated on its feature branch
    # long ago, so NEW's result for main comes at once and OLD's, evaluated now, after it.
    fast_forward, before_it = evaluated(NEW, 10, 11), evaluated(OLD, 5, 40)
    await heads.record(fast_forward)
    await heads.record(before_it)
    assert await heads.superseded_by(fast_forward) is None
    assert await heads.superseded_by(before_it) == NEW
