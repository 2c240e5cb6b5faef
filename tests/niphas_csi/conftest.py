"""Fixtures for the csi tests: a node (a chroot Nix store holding a small built closure), a
kubelet-like pods dir, and the real driver serving its unix socket in this process, called
through the generated CSI stubs exactly as kubelet calls it. Every mount made under the test's
tmp dir is lazily unmounted at teardown, even when the test failed."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from niphas_common.nix.runner import NixRunner
from niphas_common.settings import NatsSettings
from niphas_csi import mounts
from niphas_csi.app import run
from niphas_csi.proto import csi_pb2, csi_pb2_grpc
from niphas_csi.settings import CsiSettings
from tests.nix_harness import BuiltClosure

NODE_ID = "node-a"


def unmount_below(root: Path) -> None:
    """Lazily unmount every mount at or below `root`, deepest first."""
    prefix = str(root)
    points = sorted(
        {m.mount_point for m in mounts.mounts() if m.mount_point.startswith(prefix)},
        key=len,
        reverse=True,
    )
    for point in points:
        with contextlib.suppress(OSError):
            mounts.umount(point, lazy=True)


@pytest.fixture
def mount_guard(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("the csi tests mount filesystems and must run as root")
    try:
        yield tmp_path
    finally:
        unmount_below(tmp_path)


@dataclass
class Node:
    store_root: Path
    runner: NixRunner
    pods: Path
    state_dir: Path

    def real(self, store_path: str | object) -> Path:
        return self.store_root / str(store_path).lstrip("/")

    def lease_dir(self, volume_id: str) -> Path:
        return self.store_root / "nix/var/nix/gcroots/niphas/csi" / volume_id

    def target(self, name: str = "vol") -> Path:
        """A target like kubelet's: the parent exists, the target itself does not."""
        parent = self.pods / "pod-uid" / "volumes" / "kubernetes.io~csi" / name
        parent.mkdir(parents=True, exist_ok=True)
        return parent / "mount"


@pytest.fixture
def node(mount_guard: Path, built_closure: BuiltClosure) -> Node:
    """A node whose chroot store holds the `built_closure` (copied from the host store)."""
    root = mount_guard / "node-store"
    # The host store's paths are unsigned: the copy between two local stores need not check.
    NixRunner(options={"require-sigs": "false"}).copy(built_closure.paths, to=str(root))
    pods = mount_guard / "kubelet" / "pods"
    pods.mkdir(parents=True)
    return Node(root, NixRunner(store=str(root)), pods, mount_guard / "state")


@dataclass
class Driver:
    settings: CsiSettings
    nats: NatsSettings
    identity: csi_pb2_grpc.IdentityStub = field(init=False)
    node: csi_pb2_grpc.NodeStub = field(init=False)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _channel: grpc.aio.Channel | None = None

    @property
    def socket(self) -> Path:
        return self.settings.state_dir / "csi.sock"

    async def start(self) -> None:
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(run(self.settings, self._stop, self.nats))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not self.socket.exists():
            if self._task.done():
                self._task.result()
            if loop.time() > deadline:
                raise AssertionError("the driver's socket did not appear")
            await asyncio.sleep(0.01)
        self._channel = grpc.aio.insecure_channel(f"unix://{self.socket}")
        self.identity = csi_pb2_grpc.IdentityStub(self._channel)  # type: ignore[no-untyped-call]
        self.node = csi_pb2_grpc.NodeStub(self._channel)  # type: ignore[no-untyped-call]

    async def stop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self._task is not None:
            self._stop.set()
            await asyncio.wait_for(self._task, 30)
            self._task = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def publish(
        self,
        volume_id: str,
        target: Path | str,
        store_paths: str,
        *,
        extra: dict[str, str] | None = None,
        rpc_timeout_s: float = 30,
    ) -> csi_pb2.NodePublishVolumeResponse:
        request = publish_request(volume_id, target, store_paths, extra=extra)
        response: csi_pb2.NodePublishVolumeResponse = await self.node.NodePublishVolume(
            request, timeout=rpc_timeout_s
        )
        return response

    async def unpublish(
        self, volume_id: str, target: Path | str
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        response: csi_pb2.NodeUnpublishVolumeResponse = await self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)),
            timeout=30,
        )
        return response


def publish_request(
    volume_id: str,
    target: Path | str,
    store_paths: str | None,
    *,
    extra: dict[str, str] | None = None,
) -> csi_pb2.NodePublishVolumeRequest:
    """What kubelet sends for an inline ephemeral volume with podInfoOnMount."""
    context = {
        "csi.storage.k8s.io/ephemeral": "true",
        "csi.storage.k8s.io/pod.name": "web-0",
        "csi.storage.k8s.io/pod.namespace": "default",
        "csi.storage.k8s.io/pod.uid": "0b7c7a43-6a0e-4a43-9d3c-2f0b1a2c3d4e",
        "csi.storage.k8s.io/serviceAccount.name": "default",
        **(extra or {}),
    }
    if store_paths is not None:
        context["storePath"] = store_paths
    mode = csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id,
        target_path=str(target),
        volume_capability=csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
        ),
        readonly=True,
        volume_context=context,
    )


def driver_settings(node: Node, **overrides: object) -> CsiSettings:
    return CsiSettings.model_validate(
        {
            "endpoint": f"unix://{node.state_dir / 'csi.sock'}",
            "node_id": NODE_ID,
            "store_root": node.store_root,
            "state_dir": node.state_dir,
            "allowed_target_root": node.pods,
            "fetch_timeout_s": 20.0,
            "presence_recheck_s": 0.5,
            **overrides,
        }
    )


@pytest.fixture
async def driver(node: Node, nats_settings: NatsSettings) -> AsyncIterator[Driver]:
    driver = Driver(driver_settings(node), nats_settings)
    await driver.start()
    try:
        yield driver
    finally:
        await driver.stop()


@pytest.fixture
def bare_node(mount_guard: Path) -> Node:
    """A node whose store is empty: every path must be fetched."""
    root = mount_guard / "node-store"
    (root / "nix" / "store").mkdir(parents=True)
    pods = mount_guard / "kubelet" / "pods"
    pods.mkdir(parents=True)
    return Node(root, NixRunner(store=str(root)), pods, mount_guard / "state")
