"""A full disk is first answered by GC: a mesh agent whose store root is a 40 MB tmpfs (8 MB
of it Nix's reserved space) holds two unleased 6 MB filler paths and one leased 4 MB path, and
wants two 10 MB paths from a real signed cache. The first fits; the second fails with ENOSPC,
which forces one GC pass: the fillers are deleted and withdrawn, the leased path and the
wanted path just imported stay, and the second path is fetched again and imported within the
want's deadline. `nix store verify --all` is clean afterwards. (Where GC can free nothing the
want still fails at once: test_disk_full.)"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from niphas_common.bus.bus import Bus
from niphas_common.leases import volume_dir
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.store_path import StorePath
from niphas_schemas import PathAvailable, PathWanted
from tests.faults.test_disk_full import leftovers, valid_paths
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready, seed
from tests.niphas_mesh.servers import counting_cache
from tests.niphas_mesh.test_fetch import announce_cache, verify_store
from tests.nix_harness import BuiltClosure, CacheKey, FileCache

pytestmark = [pytest.mark.nix, pytest.mark.root, pytest.mark.slow]

DISK_MB = 40
SIZES_MB = {"filler-0": 6, "filler-1": 6, "leased": 4, "wanted-0": 10, "wanted-1": 10}


@pytest.fixture
def random_paths(nix_runner: NixRunner, tmp_path: Path) -> Iterator[dict[str, StorePath]]:
    yield from _random_paths(nix_runner, tmp_path, SIZES_MB)


def _random_paths(
    nix_runner: NixRunner, tmp_path: Path, sizes: dict[str, int]
) -> Iterator[dict[str, StorePath]]:
    """One path of random bytes per entry of `sizes` in the host store, deleted afterwards."""
    dirs = []
    for name, size_mb in sizes.items():
        d = tmp_path / "random" / f"niphas-gc-{name}"
        d.mkdir(parents=True)
        for j in range(2):
            (d / f"blob-{j}").write_bytes(os.urandom((size_mb << 20) // 2))
        dirs.append(d)
    out = nix_runner.run("nix-store", "--add", *map(str, dirs)).text.split()
    paths = [StorePath.parse(p) for p in out]
    try:
        yield dict(zip(sizes, paths, strict=True))
    finally:
        nix_runner.delete(paths, check=False)


def free_mb(root: Path) -> float:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize / (1 << 20)


def full_store(
    root: Path, cache: FileCache, key: CacheKey, fillers: list[StorePath], leased: StorePath
) -> Path:
    """The node's small store at `root`: unleased fillers, and one path a volume leases."""
    seed(root, cache, key, [*fillers, leased])
    lease = volume_dir("vol-1", root)
    lease.mkdir(parents=True)
    (lease / "0").symlink_to(str(leased))
    return root


async def announcements(bus: Bus) -> tuple[list[PathAvailable], Subscription]:
    """Every path.available from now on, as they arrive."""
    events: list[PathAvailable] = []

    async def on_available(msg: Msg) -> None:
        events.append(PathAvailable.model_validate_json(msg.data))

    return events, await bus.nc.subscribe(PathAvailable.subject, cb=on_available)


async def test_a_full_disk_is_collected_and_the_want_retried(
    small_disk: Callable[[Path, int], Path],
    bus: Bus,
    start_node: StartNode,
    random_paths: dict[str, StorePath],
    nix_runner: NixRunner,
    make_file_cache: Callable[..., FileCache],
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    fillers = [random_paths["filler-0"], random_paths["filler-1"]]
    leased, wanted = random_paths["leased"], [random_paths["wanted-0"], random_paths["wanted-1"]]
    cache = make_file_cache(list(random_paths.values()), "none")
    root = full_store(
        small_disk(tmp_path / "nodes" / "full", DISK_MB), cache, cache_key, fillers, leased
    )
    assert free_mb(root) < sum(SIZES_MB[f"wanted-{i}"] for i in range(2))  # only after GC
    events, sub = await announcements(bus)
    closure = BuiltClosure(wanted[0], nix_runner.path_info(wanted))
    async with counting_cache(cache.dir) as (cache_url, served):
        await announce_cache(bus, cache_url, closure)
        # The periodic GC never runs here: only the full disk can start a pass.
        node = await start_node("full", gc_high_percent=100.0, gc_low_percent=0.0)
        await ready(node)
        await bus.publish(
            PathWanted(
                node="full",
                store_paths=tuple(map(str, wanted)),
                deadline=datetime.now(UTC) + timedelta(seconds=60),
                requester="gc-test",
            )
        )
        await eventually(lambda: all(p in node.store for p in wanted), 60)
    await sub.unsubscribe()

    valid = valid_paths(node)
    assert {str(p) for p in wanted} | {str(leased)} == valid
    withdrawn = {e.store_path for e in events if e.holder == "full" and e.state == "withdrawn"}
    assert withdrawn == {str(p) for p in fillers}
    assert not [e for e in events if e.holder == "full" and e.state == "failed"]
    # The path that fitted before GC was kept by it (one download); the other came twice.
    assert sorted(served.nar_requests.values()) == [1, 2]
    assert leftovers(node) == set()
    await verify_store(node)


TOGETHER_MB = {"filler-0": 10, "filler-1": 10, "leased": 4, "wanted-0": 10, "wanted-1": 10}


@pytest.fixture
def together_paths(nix_runner: NixRunner, tmp_path: Path) -> Iterator[dict[str, StorePath]]:
    yield from _random_paths(nix_runner, tmp_path, TOGETHER_MB)


async def test_two_wants_on_a_full_disk_both_retry_after_one_pass_made_room(
    small_disk: Callable[[Path, int], Path],
    bus: Bus,
    start_node: StartNode,
    together_paths: dict[str, StorePath],
    nix_runner: NixRunner,
    make_file_cache: Callable[..., FileCache],
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    """Neither wanted path fits until GC, and they come in two wants at once: both imports
    fail, the first forced pass frees the fillers, the second finds nothing left to free. The
    second want must still be retried (another pass made room since it began), not failed."""
    fillers = [together_paths["filler-0"], together_paths["filler-1"]]
    leased, wanted = together_paths["leased"], [together_paths[f"wanted-{i}"] for i in range(2)]
    cache = make_file_cache(list(together_paths.values()), "none")
    root = full_store(
        small_disk(tmp_path / "nodes" / "full", DISK_MB), cache, cache_key, fillers, leased
    )
    assert free_mb(root) < TOGETHER_MB["wanted-0"]  # neither fits before GC
    events, sub = await announcements(bus)
    closure = BuiltClosure(wanted[0], nix_runner.path_info(wanted))
    async with counting_cache(cache.dir) as (cache_url, _):
        await announce_cache(bus, cache_url, closure)
        node = await start_node("full", gc_high_percent=100.0, gc_low_percent=0.0)
        await ready(node)
        for i, path in enumerate(wanted):
            await bus.publish(
                PathWanted(
                    node="full",
                    store_paths=(str(path),),
                    deadline=datetime.now(UTC) + timedelta(seconds=60),
                    requester=f"gc-test-{i}",
                )
            )
        await eventually(lambda: all(p in node.store for p in wanted), 60)
    await sub.unsubscribe()

    assert {str(p) for p in wanted} | {str(leased)} == valid_paths(node)
    assert not [e for e in events if e.holder == "full" and e.state == "failed"]
    assert leftovers(node) == set()
    await verify_store(node)
