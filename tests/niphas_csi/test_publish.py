"""NodePublishVolume / NodeUnpublishVolume through the real socket, as kubelet calls them, with
real mounts over a real chroot Nix store: the view holds exactly the closure, reads work,
writes fail with EROFS, setuid is ignored, a program from the closure runs with the view at
/nix/store in a private mount namespace; a target kubelet made itself is used; repeats are
idempotent, conflicts and bad input are refused with the spec's codes and leave nothing behind;
unpublish removes mount (also mounts stacked on it) and lease."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from niphas_csi import mounts
from tests.nix_harness import BuiltClosure

from .conftest import NODE_ID, Driver, Node, publish_request

pytestmark = [pytest.mark.root, pytest.mark.nix]


def names(paths: Sequence[object]) -> set[str]:
    return {os.path.basename(str(p)) for p in paths}


async def test_identity_and_node_info(driver: Driver) -> None:
    from niphas_csi.proto import csi_pb2

    info = await driver.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.niphas.io"
    assert info.vendor_version
    probe = await driver.identity.Probe(csi_pb2.ProbeRequest())
    assert probe.ready.value is True
    caps = await driver.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    assert list(caps.capabilities) == []
    node_info = await driver.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert node_info.node_id == NODE_ID
    node_caps = await driver.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    assert list(node_caps.capabilities) == []  # no STAGE_UNSTAGE: kubelet calls publish only


async def test_publish_mounts_exactly_the_closure_read_only(
    driver: Driver, node: Node, built_closure: BuiltClosure
) -> None:
    target = node.target()
    await driver.publish("csi-abc", target, str(built_closure.app))

    assert set(os.listdir(target)) == names(built_closure.paths)
    lib = next(p for p in built_closure.paths if p.name.endswith("-lib"))
    assert (target / lib.base_name / "share" / "greeting").read_text() == "hello from niphas\n"
    # The same inode as the node store's file: shared, not copied.
    real = node.real(lib) / "share" / "greeting"
    assert os.stat(target / lib.base_name / "share" / "greeting").st_ino == os.stat(real).st_ino

    with pytest.raises(OSError, match="Read-only file system") as err:
        (target / lib.base_name / "new-file").write_text("x")
    assert err.value.errno == errno.EROFS
    with pytest.raises(OSError, match="Read-only file system") as err:
        (target / "new-dir").mkdir()
    assert err.value.errno == errno.EROFS

    [mount] = mounts.mounted_at(target)
    assert {"ro", "nosuid", "nodev"} <= mount.options
    assert len(list(node.lease_dir("csi-abc").iterdir())) == 1  # the requested path's link


async def test_program_from_the_closure_runs_with_the_view_at_nix_store(
    driver: Driver, node: Node, built_closure: BuiltClosure
) -> None:
    target = node.target()
    await driver.publish("csi-run", target, str(built_closure.app))
    program = f"{built_closure.app}/bin/demo"
    # The pod's view: a private mount namespace where /nix/store is the volume. A path outside
    # the closure is absent there.
    script = (
        f"mount --bind {target} /nix/store && {program} && "
        f"ls /nix/store | wc -l && test ! -e /nix/store/{'0' * 32}-absent"
    )
    out = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    assert out == ["hello", "from", "niphas", str(len(built_closure.paths))]


async def test_setuid_bits_are_ignored(driver: Driver, node: Node, nix_runner: object) -> None:
    # A store path with a setuid-root copy of `id` (Nix never makes one; root on the node can).
    src = node.store_root.parent / "suid-src"
    (src / "bin").mkdir(parents=True)
    shutil.copy2("/usr/bin/id", src / "bin" / "id")
    path = node.runner.add_to_store(src)
    real_id = node.real(path) / "bin" / "id"
    os.chmod(real_id, 0o4755)
    try:
        target = node.target()
        await driver.publish("csi-suid", target, str(path))
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

        def euid(binary: Path) -> str:
            return subprocess.run(
                [*as_nobody, str(binary), "-u"], capture_output=True, text=True, check=True
            ).stdout.strip()

        assert euid(real_id) == "0"  # the bit works where the store itself is mounted
        assert euid(target / path.base_name / "bin" / "id") == "65534"  # not in the view
    finally:
        os.chmod(real_id, 0o555)


async def test_publish_twice_is_ok_with_one_mount(
    driver: Driver, node: Node, built_closure: BuiltClosure
) -> None:
    target = node.target()
    for _ in range(3):
        await driver.publish("csi-twice", target, str(built_closure.app))
    assert len(mounts.mounted_at(target)) == 1


async def test_a_target_kubelet_already_made_is_mounted(
    driver: Driver, node: Node, built_closure: BuiltClosure
) -> None:
    target = node.target()
    target.mkdir()
    await driver.publish("csi-made", target, str(built_closure.app))
    assert len(mounts.mounted_at(target)) == 1
    assert set(os.listdir(target)) == names(built_closure.paths)


async def test_unpublish_removes_mounts_stacked_on_the_target(
    driver: Driver, node: Node, built_closure: BuiltClosure
) -> None:
    target = node.target()
    await driver.publish("csi-stack", target, str(built_closure.app))
    mounts.mount("tmpfs", target, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV)
    assert len(mounts.mounted_at(target)) == 2
    await driver.unpublish("csi-stack", target)
    assert not mounts.mounted_at(target)
    assert not target.exists()


async def test_unpublish_never_unmounts_through_a_symlink(
    driver: Driver, node: Node, built_closure: BuiltClosure
) -> None:
    target = node.target()
    await driver.publish("csi-swap", target, str(built_closure.app))
    # The target lost its mount and was swapped for a symlink to someone else's mount.
    mounts.umount(target)
    target.rmdir()
    elsewhere = node.pods.parent / "elsewhere"
    elsewhere.mkdir()
    mounts.mount("tmpfs", elsewhere, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV)
    target.symlink_to(elsewhere)
    with pytest.raises(grpc.aio.AioRpcError):
        await driver.unpublish("csi-swap", target)  # it cannot remove a symlink as its dir
    assert mounts.is_mountpoint(elsewhere)


async def test_conflicting_publish_is_already_exists(
    driver: Driver, node: Node, built_closure: BuiltClosure
) -> None:
    target = node.target("first")
    await driver.publish("csi-one", target, str(built_closure.app))
    other = node.target("second")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await driver.publish("csi-one", other, str(built_closure.app))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert str(target) in (err.value.details() or "")
    assert not other.exists()

    lib = next(p for p in built_closure.paths if p.name.endswith("-lib"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await driver.publish("csi-one", target, str(lib))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(mounts.mounted_at(target)) == 1
    assert os.path.exists(target / built_closure.app.base_name)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("bad-store-path", "is not a store path"),
        ("relative-target", "not an absolute path"),
        ("outside-root", "outside the allowed root"),
        ("dotdot-target", "not a normalised path"),
        ("missing-store-path", "'storePath' is required"),
        ("missing-volume-id", "volume_id is required"),
        ("block-access", "block access is not supported"),
        ("no-capability", "mount access is required"),
        ("s3-binary-cache", "volume attribute 'binaryCache': 's3://bucket' is not an http(s)"),
        ("bad-binary-cache-key", "volume attribute 'binaryCachePublicKey': 'k1' is not a Nix"),
    ],
)
async def test_invalid_requests_are_refused_and_leave_nothing(
    driver: Driver, node: Node, built_closure: BuiltClosure, case: str, message: str
) -> None:
    target = node.target()
    volume_id = "csi-bad"
    request = publish_request(volume_id, target, str(built_closure.app))
    if case == "bad-store-path":
        request.volume_context["storePath"] = f"{built_closure.app} /nix/store/not-a-hash-x"
    elif case == "relative-target":
        request.target_path = "pods/x/mount"
    elif case == "outside-root":
        request.target_path = str(node.pods.parent / "elsewhere")
    elif case == "dotdot-target":
        request.target_path = f"{node.pods}/a/../../escape"
    elif case == "missing-store-path":
        del request.volume_context["storePath"]
    elif case == "missing-volume-id":
        request.volume_id = ""
    elif case == "block-access":
        request.volume_capability.block.SetInParent()
    elif case == "no-capability":
        request.ClearField("volume_capability")
    elif case == "s3-binary-cache":
        request.volume_context["binaryCache"] = "s3://bucket"
    elif case == "bad-binary-cache-key":
        request.volume_context["binaryCache"] = "https://cache.example"
        request.volume_context["binaryCachePublicKey"] = "k1"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await driver.node.NodePublishVolume(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    assert not target.exists()
    assert not node.lease_dir(volume_id).exists()
    assert not [m for m in mounts.mounts() if m.mount_point.startswith(str(node.pods))]


async def test_unpublish_removes_mount_lease_and_target(
    driver: Driver, node: Node, built_closure: BuiltClosure
) -> None:
    target = node.target()
    await driver.publish("csi-gone", target, str(built_closure.app))
    assert node.lease_dir("csi-gone").exists()
    await driver.unpublish("csi-gone", target)
    assert not target.exists()
    assert not mounts.is_mountpoint(target)
    assert not node.lease_dir("csi-gone").exists()
    # The view went with its last user.
    assert not [m for m in mounts.mounts() if m.source == "niphas-csi"
                and m.mount_point.startswith(f"{node.state_dir}/")]  # fmt: skip
    # Again, and for a volume never seen: both succeed.
    await driver.unpublish("csi-gone", target)
    await driver.unpublish("csi-never-seen", node.target("other"))


async def test_volumes_of_one_closure_share_one_view(
    driver: Driver, node: Node, built_closure: BuiltClosure
) -> None:
    first, second = node.target("a"), node.target("b")
    await driver.publish("csi-a", first, str(built_closure.app))
    await driver.publish("csi-b", second, str(built_closure.app))
    staging = node.state_dir / "csi" / "staging" / "views"
    views = [m for m in mounts.mounts() if m.mount_point.startswith(str(staging))]
    assert len(views) == 1
    await driver.unpublish("csi-a", first)
    assert set(os.listdir(second)) == names(built_closure.paths)
    await driver.unpublish("csi-b", second)
    assert not [m for m in mounts.mounts() if m.mount_point.startswith(str(staging))]
