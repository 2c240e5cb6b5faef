"""The builder end to end in one process, against a real nats-server and the real nix:
a built closure lands in the cache signed and zstd-compressed, a stock nix client substitutes
it only with the right trusted key, path.available announces every pushed path, an
everything-cached evaluation builds nothing, a failing derivation gives one failed build.done
with its log tail, the same eval.done delivered twice builds and pushes once, and a commit
evaluated again for another push (fast-forwarded onto main) is built once and answered for
each push, the second `cached`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from niphas_builder.app import wired
from niphas_builder.settings import BuilderSettings
from niphas_builder.single_flight import BUCKET
from niphas_common.bus.bus import Bus
from niphas_common.bus.consumer import Delivery
from niphas_common.nix.cache_client import BinaryCacheClient
from niphas_common.nix.errors import CommandError
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.signing import SecretKey
from niphas_schemas import HOLDERS_BUCKET, BuildDone, PathAvailable
from niphas_schemas.holders import path_key
from tests.nix_harness import CacheKey

from .conftest import BuildFlake
from .helpers import events, http_cache, running_builder

pytestmark = [pytest.mark.nix]


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def wait_build_done(bus: Bus, count: int = 1) -> list[BuildDone]:
    found: list[BuildDone] = []

    async def check() -> bool:
        found[:] = await events(bus, BuildDone)
        return len(found) >= count

    for _ in range(600):
        if await check():
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"{count} build.done not published: {found}")


async def test_built_closure_is_signed_and_substitutable(
    bus: Bus,
    build_flake: Callable[..., BuildFlake],
    builder_settings: BuilderSettings,
    cache_key: CacheKey,
    nix_runner: NixRunner,
    tmp_path: Path,
) -> None:
    flake = build_flake()
    event = flake.eval_done("app", pushed_at=datetime(2030, 1, 1, tzinfo=UTC))
    app = flake.attribute("app").outputs["out"]
    async with running_builder(bus, builder_settings):
        await bus.publish(event)
        [done] = await wait_build_done(bus)

    assert done.status == "built", done.log_tail
    assert done.eval_event_id == event.event_id
    # The push it came from, for the operator to match its branch and order it.
    assert done.ref == event.ref == "refs/heads/main"
    assert done.pushed_at == event.pushed_at
    assert done.built_on == "builder-test"
    assert done.cache_url == builder_settings.read_url
    infos = nix_runner.path_info([app], recursive=True)
    assert set(done.closure) == set(infos) and len(infos) == 3  # app, lib, tools
    [out] = done.outputs
    assert (out.name, out.path) == ("out", app)
    assert out.nar_hash == infos[app].nar_hash.nix32
    assert out.nar_size == infos[app].nar_size
    assert set(out.references) == {str(r) for r in infos[app].references}

    # In the cache: every path of the closure, signed, zstd, NARs matching their hashes.
    cache_dir = tmp_path / "cache"
    async with BinaryCacheClient(builder_settings.read_url, cache_key.trusted) as client:
        narinfos = await client.closure([app])
        assert {str(p) for p in narinfos} == set(infos)
        for info in narinfos.values():
            assert info.compression == "zstd"
            async for _ in client.iter_nar(info):
                pass

    announced = await events(bus, PathAvailable)
    assert {a.store_path for a in announced} == set(infos)
    assert all(a.holder_kind == "cache" and a.holder_url == done.cache_url for a in announced)

    # A stock nix client substitutes it over HTTP with the cluster key trusted...
    with http_cache(cache_dir) as url:
        good = tmp_path / "store-good"
        nix_runner.run(
            "nix", "copy", "--from", url, "--to", str(good), app,
            "--option", "trusted-public-keys", str(cache_key.public),
        )  # fmt: skip
        assert (good / app.removeprefix("/")).joinpath("bin", "app").exists()
        # ...and refuses it when another key is the trusted one.
        other = SecretKey.generate("niphas-test-1").public_key  # same name, other key
        with pytest.raises(CommandError, match="lacks a valid signature"):
            nix_runner.run(
                "nix", "copy", "--from", url, "--to", str(tmp_path / "store-bad"), app,
                "--option", "trusted-public-keys", str(other),
            )  # fmt: skip


async def test_everything_cached_builds_nothing(
    bus: Bus,
    build_flake: Callable[..., BuildFlake],
    builder_settings: BuilderSettings,
    nix_runner: NixRunner,
) -> None:
    flake = build_flake()
    first = flake.eval_done("app")
    async with running_builder(bus, builder_settings):
        await bus.publish(first)
        [built] = await wait_build_done(bus)
        assert built.status == "built"
        builds = counter("niphas_builder_builds_total", outcome="built")
        pushes = counter("niphas_builder_pushes_total")
        # A later commit naming the same derivation, once the first result left the KV.
        await lease_bucket_empty(bus, builder_settings)
        second = flake.eval_done("app", commit="b" * 40)
        await bus.publish(second)
        _, cached = await wait_build_done(bus, 2)

    assert cached.status == "cached" and cached.commit == "b" * 40
    assert cached.outputs == built.outputs
    assert set(cached.closure) == set(built.closure)
    assert counter("niphas_builder_builds_total", outcome="built") == builds
    assert counter("niphas_builder_pushes_total") == pushes


async def lease_bucket_empty(bus: Bus, settings: BuilderSettings) -> None:
    """Wait until the recorded results aged out of the lease bucket (its TTL)."""
    kv = await bus.js.key_value(BUCKET)
    for _ in range(int(settings.lease_ttl_s * 20) + 100):
        status = await kv.status()
        if status.values == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("lease bucket never emptied")


async def test_failing_derivation_publishes_one_failure_with_log_tail(
    bus: Bus,
    build_flake: Callable[..., BuildFlake],
    builder_settings: BuilderSettings,
) -> None:
    flake = build_flake()
    event = flake.eval_done("fail", "app")
    failed_before = counter("niphas_builder_builds_total", outcome="failed")
    async with running_builder(bus, builder_settings):
        await bus.publish(event)
        done = await wait_build_done(bus, 2)
        # Acked, not retried: nothing more arrives and the consumer has nothing pending.
        await asyncio.sleep(1.0)
        info = await bus.js.consumer_info("EVAL_DONE", builder_settings.durable)

    assert len(await events(bus, BuildDone)) == 2
    by_attr = {d.attribute: d for d in done}
    failed = by_attr["fail"]
    assert failed.status == "failed" and failed.outputs == ()
    assert failed.log_tail is not None
    assert "log line 100" in failed.log_tail and "boom: the build broke" in failed.log_tail
    assert "log line 1\n" not in failed.log_tail  # a tail, not the whole log
    assert by_attr["app"].status == "built"
    assert counter("niphas_builder_builds_total", outcome="failed") == failed_before + 1
    assert info.num_ack_pending == 0 and info.num_pending == 0
    assert info.num_redelivered == 0


async def test_same_eval_done_delivered_twice_builds_and_pushes_once(
    bus: Bus,
    build_flake: Callable[..., BuildFlake],
    builder_settings: BuilderSettings,
) -> None:
    flake = build_flake(sleep=2)
    event = flake.eval_done("slow")
    builds = counter("niphas_builder_builds_total", outcome="built")
    pushes = counter("niphas_builder_pushes_total")
    waits = counter("niphas_builder_lease_waits_total")
    async with running_builder(bus, builder_settings):
        # Twice, bypassing the stream's de-duplication (as a redelivery would).
        body = event.model_dump_json().encode()
        await bus.js.publish(event.subject, body)
        await bus.js.publish(event.subject, body)
        await wait_build_done(bus)
        await asyncio.sleep(1.0)
        info = await bus.js.consumer_info("EVAL_DONE", builder_settings.durable)
        assert info.num_ack_pending == 0 and info.num_pending == 0

    [done] = await events(bus, BuildDone)  # the second is the same Msg-Id: stored once
    assert done.status == "built"
    assert counter("niphas_builder_builds_total", outcome="built") == builds + 1
    assert counter("niphas_builder_pushes_total") == pushes + 1
    assert counter("niphas_builder_lease_waits_total") == waits + 1


async def test_each_push_of_a_commit_gets_a_build_done_and_the_build_runs_once(
    bus: Bus,
    build_flake: Callable[..., BuildFlake],
    builder_settings: BuilderSettings,
) -> None:
    flake = build_flake()
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    on_feature = flake.eval_done(
        "app", ref="refs/heads/feature", push_event_id="push-feature", pushed_at=t0
    )
    # The same commit fast-forwarded onto main: the same evaluation, another push.
    on_main = flake.eval_done("app", push_event_id="push-main", pushed_at=t0 + timedelta(minutes=5))
    # The built result stays in the lease bucket all test long, as it does moments after a build.
    settings = builder_settings.model_copy(update={"lease_ttl_s": 120.0})
    builds = counter("niphas_builder_builds_total", outcome="built")
    pushes = counter("niphas_builder_pushes_total")
    async with running_builder(bus, settings):
        await bus.publish(on_feature)
        await wait_build_done(bus, 1)
        await bus.publish(on_main)
        await wait_build_done(bus, 2)
        # main's eval.done delivered again: the same build.done, stored once.
        await bus.js.publish(on_main.subject, on_main.model_dump_json().encode())
        for _ in range(600):
            info = await bus.js.consumer_info("EVAL_DONE", settings.durable)
            if info.delivered.consumer_seq >= 3 and info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.05)
        assert info.num_pending == 0 and info.num_ack_pending == 0

    by_eval = {d.eval_event_id: d for d in await events(bus, BuildDone)}
    assert set(by_eval) == {on_feature.event_id, on_main.event_id}
    feature, main = by_eval[on_feature.event_id], by_eval[on_main.event_id]
    assert (feature.status, main.status) == ("built", "cached")
    assert (feature.ref, main.ref) == ("refs/heads/feature", "refs/heads/main")
    assert (feature.pushed_at, main.pushed_at) == (on_feature.pushed_at, on_main.pushed_at)
    assert main.outputs == feature.outputs and main.drv_path == feature.drv_path
    assert main.cache_url == feature.cache_url is not None
    assert counter("niphas_builder_builds_total", outcome="built") == builds + 1
    assert counter("niphas_builder_pushes_total") == pushes + 1


async def test_a_redelivered_eval_done_announces_the_cache_again(
    bus: Bus,
    build_flake: Callable[..., BuildFlake],
    builder_settings: BuilderSettings,
) -> None:
    """A first attempt that pushed but whose announcements were not stored (a NATS cluster
    electing a leader) is retried: the retry finds the build done and announces again, so a
    node's mesh can still learn that the cache holds the closure."""
    flake = build_flake()
    event = flake.eval_done("app")
    holders = await bus.state(HOLDERS_BUCKET)

    async def announced(paths: tuple[str, ...]) -> set[str]:
        url = builder_settings.read_url
        keys = [path_key(p, "cache", "cache", url) for p in paths]
        return {k for k in keys if await holders.get(k) is not None}

    async with wired(bus, builder_settings) as builder:
        await builder.handle(event, delivery(1))
        [done] = await events(bus, BuildDone)
        assert done.status == "built"
        keys = await announced(done.closure)
        assert len(keys) == len(done.closure) == 3
        for key in keys:  # as if the first attempt's announcements were lost
            await holders.delete(key)

        await builder.handle(event, delivery(1))  # a first delivery answers without them
        assert await announced(done.closure) == set()
        await builder.handle(event, delivery(2))  # the redelivery announces again
        assert await announced(done.closure) == keys


def delivery(num_delivered: int) -> Delivery:
    return Delivery(subject="eval.done", stream_sequence=1, num_delivered=num_delivered, headers={})
