"""Importing a closure fetched at once: the paths that land while another is still downloading
wait for it, and the whole closure goes to Nix in one `nix copy` (each Nix process costs CPU a
node under a tight quota does not have)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.nix.runner import NixRunner, PathInfo
from niphas_common.nix.store_path import StorePath
from niphas_schemas import PathWanted
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready
from tests.niphas_mesh.servers import counting_cache, nar_file
from tests.niphas_mesh.test_fetch import announce_cache, verify_store
from tests.nix_harness import BuiltClosure, FileCache

pytestmark = [pytest.mark.nix, pytest.mark.root, pytest.mark.slow]

PATHS = 8


def independent_paths(runner: NixRunner, base: Path, n: int) -> list[StorePath]:
    """`n` store paths of 4 MiB of random bytes each, none referring to another."""
    dirs = []
    for i in range(n):
        d = base / f"batch-{i}"
        d.mkdir(parents=True)
        (d / "data").write_bytes(os.urandom(4 << 20))
        dirs.append(str(d))
    return [StorePath.parse(p) for p in runner.run("nix-store", "--add", *dirs).text.split()]


async def test_a_closure_wanted_at_once_is_imported_in_one_batch(
    bus: Bus,
    start_node: StartNode,
    nix_runner: NixRunner,
    make_file_cache: Callable[..., FileCache],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paths = independent_paths(nix_runner, tmp_path / "src", PATHS)
    infos: dict[str, PathInfo] = nix_runner.path_info(paths)
    cache = make_file_cache(paths, "none")
    # The last path's NAR stops half way until the others have landed.
    hold = asyncio.Event()
    late = nar_file(cache.dir, paths[-1].hash_part)
    async with counting_cache(cache.dir, hold, only={late}) as (cache_url, _):
        await announce_cache(bus, cache_url, BuiltClosure(paths[0], infos))
        node = await start_node("n1")
        await ready(node)
        batches: list[int] = []
        import_from = node.store.import_from

        async def counted(url: str, batch: Sequence[StorePath]) -> None:
            batches.append(len(batch))
            await import_from(url, batch)

        monkeypatch.setattr(node.store, "import_from", counted)
        await bus.publish(
            PathWanted(
                node="n1",
                store_paths=tuple(map(str, paths)),
                deadline=datetime.now(UTC) + timedelta(seconds=60),
                requester="t",
            )
        )
        landed = node.fetcher.importer.incoming / "nar"

        def others_landed() -> bool:  # downloaded, waiting for the import or imported already
            imported = sum(p in node.store for p in paths)
            return imported + len(list(landed.glob("*.nar"))) >= PATHS - 1

        await eventually(others_landed, 60)
        hold.set()
        await eventually(lambda: all(p in node.store for p in paths), 60)
    assert batches == [PATHS]
    await verify_store(node)
