"""An upstream that dies mid-stream under a fan-out: node `a` fetches an 8 MB path from a real
cache over HTTP, node `b` streams it from `a` while `a` is still receiving it, and then the
cache drops `a`'s connection half way. `b` is cut off too (it got part of the NAR from `a`),
imports nothing bad and falls back to another source; `a` retries; both end with the path
valid and `nix store verify` clean, within the wants' deadlines. The cache sent half a NAR
plus at most one whole copy per node."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.store_path import StorePath
from niphas_schemas import PathAvailable
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready
from tests.niphas_mesh.servers import counting_cache, nar_file
from tests.niphas_mesh.test_fan_out import served as served_by_node
from tests.niphas_mesh.test_fetch import announce_cache, rejected, verify_store, want
from tests.nix_harness import BuiltClosure, FileCache

pytestmark = [pytest.mark.nix, pytest.mark.root, pytest.mark.slow]

PATH_MB = 8


@pytest.fixture
def big_path(nix_runner: NixRunner, tmp_path: Path) -> Iterator[BuiltClosure]:
    """One 8 MB path of random bytes in the host store, deleted afterwards."""
    d = tmp_path / "src" / "niphas-cut"
    d.mkdir(parents=True)
    for i in range(4):
        (d / f"blob-{i}").write_bytes(os.urandom((PATH_MB << 20) // 4))
    path = StorePath.parse(nix_runner.run("nix-store", "--add", str(d)).text.strip())
    try:
        yield BuiltClosure(path, nix_runner.path_info([path]))
    finally:
        nix_runner.delete([path], check=False)


async def test_a_follower_survives_its_upstream_dying_mid_stream(
    bus: Bus,
    start_node: StartNode,
    big_path: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
) -> None:
    cache = make_file_cache(big_path.paths, "none")
    path = big_path.app
    nar = nar_file(cache.dir, path.hash_part)
    size = (cache.dir / nar).stat().st_size
    events: list[PathAvailable] = []

    async def on_available(msg: object) -> None:
        events.append(PathAvailable.model_validate_json(msg.data))  # type: ignore[attr-defined]

    sub = await bus.nc.subscribe(PathAvailable.subject, cb=on_available)
    cut = asyncio.Event()
    async with counting_cache(cache.dir, cut=cut) as (cache_url, served):
        await announce_cache(bus, cache_url, big_path)
        # A stall timeout longer than the test's wait: only the cut ends the first response.
        a = await start_node("a", stall_timeout_s=30.0)
        b = await start_node("b", stall_timeout_s=30.0)
        await ready(a)
        await ready(b)
        await want(bus, "a", big_path, within_s=90, who="first")

        def receiving(node: str) -> bool:
            partial = (a if node == "a" else b).fetcher.inflight.get(path.hash_part)
            return partial is not None and partial.written > 0

        await eventually(lambda: receiving("a"), 30)
        await want(bus, "b", big_path, within_s=90, who="second")
        # b has part of the NAR, from a, which has only the first half from the cache.
        await eventually(lambda: receiving("b"), 30)
        assert served_by_node("a", "fetching") == 0  # counted when a stream ends
        cut.set()
        await eventually(lambda: path in a.store and path in b.store, 80)
    await sub.unsubscribe()

    await verify_store(a)
    await verify_store(b)
    assert served_by_node("a", "fetching") > 0  # b really streamed from a before the cut
    assert rejected("b", "a", "error") > 0  # and saw that stream cut off
    assert not [e for e in events if e.state == "failed"]
    assert served.cut == 1
    whole = served.nar_requests[nar] - 1
    assert 1 <= whole <= 2  # a's retry, and b's fallback unless it streamed a's retry
    assert served.nar_bytes == size // 2 + whole * size
