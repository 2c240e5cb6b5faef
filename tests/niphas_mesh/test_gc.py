"""Garbage collection at the high watermark (a tiny watermark, so any disk is "full"): it
removes unleased paths only, least recently used first, keeps everything a lease (the CSI
driver's GC roots, `niphas_common.leases`) reaches, withdraws what it removed, and Nix itself
refuses to delete a leased path."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from niphas_common.leases import leased_paths, leases_root, volume_dir
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.store_path import StorePath
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready, seed
from tests.nix_harness import BuiltClosure, CacheKey, FileCache, Flake

pytestmark = [pytest.mark.nix, pytest.mark.root, pytest.mark.slow]


def test_lease_layout(tmp_path: Path) -> None:
    assert leases_root() == Path("/nix/var/nix/gcroots/niphas/csi")
    vol = volume_dir("vol-1", tmp_path)
    assert vol == tmp_path / "nix/var/nix/gcroots/niphas/csi/vol-1"
    vol.mkdir(parents=True)
    path = "/nix/store/" + "a" * 32 + "-x"
    (vol / "0").symlink_to(path)
    (vol / "1").symlink_to(path + "/bin/x")
    assert leased_paths(tmp_path) == {path}
    with pytest.raises(ValueError, match="volume id"):
        volume_dir("../escape", tmp_path)


async def test_gc_removes_unleased_paths_only_and_withdraws_them(
    start_node: StartNode,
    built_closure: BuiltClosure,
    make_flake: Callable[..., Flake],
    make_file_cache: Callable[..., FileCache],
    nix_runner: NixRunner,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    other = nix_runner.build([make_flake(name="other", greeting="collect me").installable("app")])
    other_app = StorePath.parse(other[0]["outputs"]["out"])
    other_paths = [i.path for i in nix_runner.path_info([other_app], recursive=True).values()]
    cache = make_file_cache([*built_closure.paths, *other_paths], "none")
    root = tmp_path / "nodes" / "gc"
    seed(root, cache, cache_key, [built_closure.app, other_app])
    lease = volume_dir("vol-1", root)
    lease.mkdir(parents=True)
    (lease / "0").symlink_to(str(built_closure.app))

    node = await start_node("gc", gc_high_percent=0.001, gc_low_percent=0.0)
    await ready(node)
    collectable = {str(p) for p in other_paths} - {str(p) for p in built_closure.paths}
    await eventually(lambda: collectable <= node.index.held_by(node.url))
    node.last_use.touch(other_app.hash_part)

    assert not await node.store.delete(built_closure.app)  # Nix refuses: it is leased
    deleted = await node.collect()

    assert {str(i.path) for i in deleted} == collectable
    for path in built_closure.paths:
        assert path in node.store
        assert os.path.exists(node.store.real_path(path))
    for hash_part in (StorePath.parse(p).hash_part for p in collectable):
        assert node.store.lookup(hash_part) is None
    await eventually(lambda: not collectable & node.index.held_by(node.url))
    keys = {"trusted-public-keys": str(cache_key.public)}
    await NixRunner(store=str(root), options=keys).arun("nix", "store", "verify", "--all")
