"""Leases against the real garbage collector (also across a driver restart), reconciling at
start (a record a crash left torn is dropped), the shared-kubelet-dir propagation pitfall, and
the node store left intact (`nix store verify`) after many publish/unpublish cycles."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from pathlib import Path

import pytest

from niphas_csi import mounts
from tests.nix_harness import BuiltClosure

from .conftest import Driver, Node

pytestmark = [pytest.mark.root, pytest.mark.nix]


def collect_garbage(node: Node) -> str:
    return node.runner.run("nix-collect-garbage").stderr


def present(node: Node, closure: BuiltClosure) -> list[bool]:
    return [node.real(p).exists() for p in closure.paths]


async def test_gc_never_takes_a_mounted_closure_even_across_a_restart(
    driver: Driver, node: Node, built_closure: BuiltClosure
) -> None:
    target = node.target()
    await driver.publish("csi-gc", target, str(built_closure.app))
    collect_garbage(node)
    assert all(present(node, built_closure))

    await driver.restart()
    collect_garbage(node)
    assert all(present(node, built_closure))
    assert mounts.is_mountpoint(target)
    assert f"{built_closure.app.base_name}" in os.listdir(target)
    # The restarted driver still knows the volume: the same publish is a no-op...
    await driver.publish("csi-gc", target, str(built_closure.app))
    assert len(mounts.mounted_at(target)) == 1
    # ...and unpublish releases it, after which GC may take every path.
    await driver.unpublish("csi-gc", target)
    collect_garbage(node)
    assert not any(present(node, built_closure))


async def test_restart_drops_orphaned_leases_and_remounts_lost_targets(
    driver: Driver, node: Node, built_closure: BuiltClosure
) -> None:
    target = node.target()
    await driver.publish("csi-keep", target, str(built_closure.app))
    await driver.stop()
    # While the driver is down: a publish that crashed half-way left a lease, and the
    # target lost its mount (e.g. someone unmounted it by hand).
    orphan = node.lease_dir("csi-crashed")
    orphan.mkdir(parents=True)
    os.symlink(str(built_closure.app), orphan / built_closure.app.base_name)
    mounts.umount(target)
    await driver.start()
    assert not orphan.exists()
    assert node.lease_dir("csi-keep").exists()
    assert mounts.is_mountpoint(target)
    assert built_closure.app.base_name in os.listdir(target)


async def test_a_torn_record_is_dropped_at_start_with_its_lease(
    driver: Driver, node: Node, built_closure: BuiltClosure
) -> None:
    target = node.target()
    await driver.publish("csi-keep", target, str(built_closure.app))
    await driver.stop()
    # Records are not fsynced: after a power loss one may be empty (its mount is gone too).
    records = node.state_dir / "csi" / "volumes"
    (records / "csi-torn.json").write_text("")
    (records / "csi-cut.json").write_text('{"volume_id": "csi-cut", "tar')
    torn_lease = node.lease_dir("csi-torn")
    torn_lease.mkdir(parents=True)
    os.symlink(str(built_closure.app), torn_lease / built_closure.app.base_name)
    await driver.start()
    assert sorted(p.name for p in records.iterdir()) == ["csi-keep.json"]
    assert not torn_lease.exists()
    assert mounts.is_mountpoint(target)
    await driver.unpublish("csi-keep", target)


async def test_peer_copies_in_a_shared_kubelet_dir_are_read_only(
    driver: Driver, node: Node, built_closure: BuiltClosure, tmp_path: Path
) -> None:
    # kubelet's dir with Bidirectional propagation: a shared mount with a peer elsewhere.
    mounts.mount(node.pods, node.pods, None, mounts.MS_BIND)
    mounts.mount("none", node.pods, None, 1 << 20)  # MS_SHARED
    peer = tmp_path / "peer"
    peer.mkdir()
    mounts.mount(node.pods, peer, None, mounts.MS_BIND)
    target = node.target()
    await driver.publish("csi-shared", target, str(built_closure.app))
    copy = peer / target.relative_to(node.pods)
    assert built_closure.app.base_name in os.listdir(copy)
    with pytest.raises(OSError, match="Read-only file system") as err:
        (copy / built_closure.app.base_name / "x").write_text("x")
    assert err.value.errno == errno.EROFS
    [mount] = mounts.mounted_at(copy)
    assert {"ro", "nosuid", "nodev"} <= mount.options
    await driver.unpublish("csi-shared", target)
    assert not mounts.is_mountpoint(copy)


@pytest.mark.slow
async def test_store_verifies_clean_after_many_cycles(
    driver: Driver, node: Node, built_closure: BuiltClosure
) -> None:
    for cycle in range(15):
        targets = [node.target(f"v{cycle}-{i}") for i in range(2)]
        await asyncio.gather(
            *(
                driver.publish(f"csi-c{cycle}-{i}", t, str(built_closure.app))
                for i, t in enumerate(targets)
            )
        )
        for path in os.listdir(targets[0]):
            os.listdir(targets[0] / path)
        await asyncio.gather(
            *(driver.unpublish(f"csi-c{cycle}-{i}", t) for i, t in enumerate(targets))
        )
    result = node.runner.run("nix", "store", "verify", "--all", "--no-trust", check=False)
    assert result.returncode == 0, result.stderr
    assert "modified" not in result.stderr
    # This driver's views (other drivers on the machine may have their own meanwhile).
    assert not [
        m
        for m in mounts.mounts()
        if m.source == "niphas-csi" and m.mount_point.startswith(f"{node.state_dir}/")
    ]
    assert not list((node.store_root / "nix/var/nix/gcroots/niphas/csi").iterdir())
    # And nothing was written into the store's directories by the views.
    out = subprocess.run(
        ["find", str(node.store_root / "nix/store"), "-newer", str(node.state_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [] or all(p.endswith(".lock") for p in out)
