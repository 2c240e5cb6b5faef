"""What a view shows of each kind of store path, through the socket: a directory with the
store's own mode and mtime (also when the driver runs under a umask that would mask them), a
regular-file store path (bound read-only inside the view) and a symlink store path recreated
as the same symlink; a torn-down view leaves no meta layer behind; a path the database holds
but the disk does not fails the publish naming it."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator

import grpc
import pytest

from niphas_common.settings import NatsSettings
from niphas_csi import mounts

from .conftest import Driver, Node, driver_settings

pytestmark = [pytest.mark.root, pytest.mark.nix]


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """A umask that masks read and execute bits the store's directories carry."""
    previous = os.umask(0o277)
    try:
        yield
    finally:
        os.umask(previous)


async def test_each_kind_of_store_path_shows_as_in_the_store(
    node: Node, nats_settings: NatsSettings, strict_umask: None
) -> None:
    src = node.store_root.parent / "kinds"
    (src / "tree" / "bin").mkdir(parents=True)
    (src / "tree" / "bin" / "tool").write_text("#!/bin/sh\n")
    os.chmod(src / "tree" / "bin" / "tool", 0o755)
    (src / "plain.txt").write_text("a regular file store path\n")
    os.symlink("/nix/store/elsewhere", src / "link")
    tree, plain, link = (node.runner.add_to_store(src / n) for n in ("tree", "plain.txt", "link"))

    driver = Driver(driver_settings(node), nats_settings)
    await driver.start()
    try:
        target = node.target()
        await driver.publish("csi-kinds", target, f"{tree},{plain},{link}")
        assert sorted(os.listdir(target)) == sorted(p.base_name for p in (tree, plain, link))

        store_tree, view_tree = os.stat(node.real(tree)), os.stat(target / tree.base_name)
        assert (view_tree.st_mode, view_tree.st_mtime_ns) == (
            store_tree.st_mode,
            store_tree.st_mtime_ns,
        )
        assert os.access(target / tree.base_name / "bin" / "tool", os.X_OK)

        view_plain = target / plain.base_name
        assert view_plain.read_text() == "a regular file store path\n"
        assert os.stat(view_plain).st_ino == os.stat(node.real(plain)).st_ino
        with pytest.raises(OSError, match="Read-only file system") as err:
            view_plain.open("a")
        assert err.value.errno == errno.EROFS

        assert os.readlink(target / link.base_name) == "/nix/store/elsewhere"

        await driver.unpublish("csi-kinds", target)
        meta = node.state_dir / "csi" / "staging" / "meta"
        assert os.listdir(meta) == []
        assert not [m for m in mounts.mounts() if m.mount_point.startswith(f"{node.state_dir}/")
                    and m.source == "niphas-csi"]  # fmt: skip
    finally:
        await driver.stop()


async def test_a_path_valid_in_the_database_but_gone_from_disk_is_named(
    driver: Driver, node: Node
) -> None:
    src = node.store_root.parent / "gone"
    src.mkdir()
    (src / "file").write_text("soon gone\n")
    path = node.runner.add_to_store(src)
    shutil.rmtree(node.real(path))  # by hand, behind Nix's back
    target = node.target()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await driver.publish("csi-gone-path", target, str(path))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "not on disk" in (err.value.details() or "")
    assert str(node.real(path)) in (err.value.details() or "")
    assert not node.lease_dir("csi-gone-path").exists()
    assert not mounts.is_mountpoint(target)
