"""The disk fills during a fetch: a mesh agent whose store root is a 16 MB tmpfs wants a 24 MB
closure from a real signed cache. The want ends with `path.available state=failed` events
whose error names the full disk, no partial path becomes valid (`nix store verify` is clean and
nothing but valid paths is left in the store directory), and the agent still fetches a later
closure that fits."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.store_path import StorePath
from niphas_mesh.agent import Agent
from niphas_schemas import PathAvailable, PathWanted
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready
from tests.niphas_mesh.servers import counting_cache
from tests.niphas_mesh.test_fetch import announce_cache, has_closure, verify_store, want
from tests.nix_harness import BuiltClosure, FileCache

pytestmark = [pytest.mark.nix, pytest.mark.root, pytest.mark.slow]

DISK_MB = 16
BIG_PATHS, BIG_PATH_MB = 3, 8


@pytest.fixture
def big_closure(nix_runner: NixRunner, tmp_path: Path) -> Iterator[BuiltClosure]:
    """Three 8 MB paths of random bytes in the host store, deleted afterwards."""
    dirs = []
    for i in range(BIG_PATHS):
        d = tmp_path / "big" / f"niphas-fault-big-{i}"
        d.mkdir(parents=True)
        for j in range(4):
            (d / f"blob-{j}").write_bytes(os.urandom((BIG_PATH_MB << 20) // 4))
        dirs.append(d)
    out = nix_runner.run("nix-store", "--add", *map(str, dirs)).text.split()
    paths = [StorePath.parse(p) for p in out]
    try:
        yield BuiltClosure(paths[0], nix_runner.path_info(paths))
    finally:
        nix_runner.delete(paths, check=False)


def valid_paths(agent: Agent) -> set[str]:
    """What Nix itself (not the agent's catalogue) holds valid in the node's store."""
    runner = NixRunner(store=agent.settings.store_root)
    return set(runner.run("nix", "path-info", "--all").text.split())


def leftovers(agent: Agent) -> set[str]:
    """Entries of the node's store directory that are not valid paths (Nix's own excepted;
    empty `.lock` files count: a fixed agent removes what it left)."""
    valid = {StorePath.parse(p).base_name for p in valid_paths(agent)}
    present = set(os.listdir(agent.store.real_store))
    return {name for name in present - valid if name != ".links"}


async def fill_the_disk(
    bus: Bus,
    start_node: StartNode,
    small_disk: Callable[[Path, int], Path],
    big: BuiltClosure,
    cache_url: str,
    tmp_path: Path,
) -> tuple[Agent, list[PathAvailable], set[str]]:
    """A node on a 16 MB disk wants the 24 MB closure: (node, its failed events, paths missing)."""
    small_disk(tmp_path / "nodes" / "small", DISK_MB)
    failed: list[PathAvailable] = []

    async def on_available(msg: object) -> None:
        event = PathAvailable.model_validate_json(msg.data)  # type: ignore[attr-defined]
        if event.holder == "small" and event.state == "failed":
            failed.append(event)

    sub = await bus.nc.subscribe(PathAvailable.subject, cb=on_available)
    await announce_cache(bus, cache_url, big)
    node = await start_node("small")
    await ready(node)
    deadline = datetime.now(UTC) + timedelta(seconds=15)
    await bus.publish(
        PathWanted(
            node="small",
            store_paths=tuple(map(str, big.paths)),
            deadline=deadline,
            requester="fault-test",
        )
    )
    await eventually(lambda: len(failed) > 0, 40)
    await asyncio.sleep(0.5)  # the other paths' failures are published together
    await sub.unsubscribe()
    return node, failed, {str(p) for p in big.paths if p not in node.store}


async def test_a_full_disk_fails_the_want_and_nothing_partial_becomes_valid(
    small_disk: Callable[[Path, int], Path],
    bus: Bus,
    start_node: StartNode,
    big_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
    tmp_path: Path,
) -> None:
    # (small_disk first: it is unmounted after the agent stopped.)
    cache = make_file_cache(big_closure.paths, "none")
    async with counting_cache(cache.dir) as (cache_url, _):
        node, failed, missing = await fill_the_disk(
            bus, start_node, small_disk, big_closure, cache_url, tmp_path
        )
    assert missing, "a 24 MB closure cannot fit on a 16 MB disk"
    assert {e.store_path for e in failed} == missing
    assert all(e.error and "fault-test" in e.error for e in failed)
    assert not missing & valid_paths(node)
    await verify_store(node)


async def test_the_failed_event_names_the_full_disk(
    small_disk: Callable[[Path, int], Path],
    bus: Bus,
    start_node: StartNode,
    big_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
    tmp_path: Path,
) -> None:
    cache = make_file_cache(big_closure.paths, "none")
    async with counting_cache(cache.dir) as (cache_url, _):
        _, failed, _ = await fill_the_disk(
            bus, start_node, small_disk, big_closure, cache_url, tmp_path
        )
    assert failed
    for event in failed:
        assert event.error is not None
        assert "No space left on device" in event.error, event.error


async def test_the_node_recovers_for_a_closure_that_fits(
    small_disk: Callable[[Path, int], Path],
    bus: Bus,
    start_node: StartNode,
    big_closure: BuiltClosure,
    built_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
    tmp_path: Path,
) -> None:
    cache = make_file_cache(big_closure.paths + built_closure.paths, "none")
    async with counting_cache(cache.dir) as (cache_url, _):
        node, _, _ = await fill_the_disk(
            bus, start_node, small_disk, big_closure, cache_url, tmp_path
        )
        assert leftovers(node) == set()
        await announce_cache(bus, cache_url, built_closure)
        await want(bus, "small", built_closure, within_s=40, who="after")
        await eventually(lambda: has_closure(node, built_closure), 40)
    await verify_store(node)
    assert leftovers(node) == set()
