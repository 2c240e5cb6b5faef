"""Builder processes (the real `niphas builder` command) sharing one nats-server and cache:
two builders racing on the same derivation build and push it once, and a builder SIGKILLed
mid-build leaves the cache consistent while its replacement completes the build once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.nix.cache_client import BinaryCacheClient
from niphas_schemas import BuildDone
from tests.helpers import eventually
from tests.nix_harness import CacheKey

from .conftest import BuildFlake
from .helpers import events
from .processes import BuilderProcess

pytestmark = [pytest.mark.nix, pytest.mark.slow]

STARTED, PUSHED = "build started:", "push done:"


@pytest.fixture
def builders(
    tmp_path: Path, nats_url: str, cache_key: CacheKey
) -> Iterator[Callable[[str], BuilderProcess]]:
    started: list[BuilderProcess] = []

    def start(name: str) -> BuilderProcess:
        proc = BuilderProcess(name, tmp_path, nats_url, cache_key)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


async def consumer_waiting(bus: Bus, count: int) -> None:
    """Until `count` builders are fetching from the durable consumer."""
    for _ in range(300):
        try:
            info = await bus.js.consumer_info("EVAL_DONE", "builder")
            if (info.num_waiting or 0) >= count:
                return
        except Exception:  # not created yet
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{count} builders never started fetching")


async def build_dones(bus: Bus, count: int) -> list[BuildDone]:
    for _ in range(900):
        found = await events(bus, BuildDone)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {count} build.done")


async def assert_cache_consistent(cache_dir: Path, key: CacheKey) -> int:
    """Every narinfo in the cache is signed, its NAR matches it and its references are
    there too; returns how many paths the cache holds."""
    narinfos = sorted(cache_dir.glob("*.narinfo"))
    async with BinaryCacheClient(f"file://{cache_dir}", key.trusted) as client:
        for file in narinfos:
            info = await client.get_narinfo(file.read_text().split("\n")[0].split(": ")[1])
            async for _ in client.iter_nar(info):
                pass
            await client.closure([info.store_path])
    leftovers = [p.name for p in cache_dir.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
    return len(narinfos)


async def test_two_builders_racing_build_and_push_once(
    bus: Bus, build_flake: Callable[..., BuildFlake], builders: Callable[[str], BuilderProcess]
) -> None:
    flake = build_flake(sleep=3)
    a, b = builders("builder-a"), builders("builder-b")
    await consumer_waiting(bus, 2)
    # Two evaluations (two commits) naming the same derivation, one for each builder.
    await bus.publish(flake.eval_done("slow", commit="1" * 40, ref=None))
    await bus.publish(flake.eval_done("slow", commit="2" * 40, ref=None))
    done = await build_dones(bus, 2)

    assert {d.commit for d in done} == {"1" * 40, "2" * 40}
    # Built for one of them; the other is answered from that build.
    assert sorted(d.status for d in done) == ["built", "cached"]
    assert done[0].outputs == done[1].outputs
    assert a.count(STARTED) + b.count(STARTED) == 1
    assert a.count(PUSHED) + b.count(PUSHED) == 1
    assert a.log().count("build.done") == 0  # no error lines about publishing


async def test_sigkill_mid_build_then_restart_builds_once(
    bus: Bus,
    build_flake: Callable[..., BuildFlake],
    builders: Callable[[str], BuilderProcess],
    tmp_path: Path,
    cache_key: CacheKey,
) -> None:
    flake = build_flake(sleep=6)
    first = builders("builder-killed")
    await consumer_waiting(bus, 1)
    event = flake.eval_done("slow")
    await bus.publish(event)
    await eventually(lambda: first.count(STARTED) == 1, timeout_s=60)
    await asyncio.sleep(1.0)  # inside the build's sleep
    first.kill()
    assert first.count(PUSHED) == 0
    assert await events(bus, BuildDone) == []

    second = builders("builder-restarted")
    [done] = await build_dones(bus, 1)
    await asyncio.sleep(1.0)  # nothing else arrives

    assert done.status == "built" and done.eval_event_id == event.event_id
    assert len(await events(bus, BuildDone)) == 1
    assert second.count(STARTED) == 1 and second.count(PUSHED) == 1
    held = await assert_cache_consistent(tmp_path / "cache", cache_key)
    assert held == len(done.closure) == 2  # slow -> lib
