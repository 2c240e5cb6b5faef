"""The demo plays the kubelet (there is none here): read the Deployment the operator rendered,
NodePublishVolume with its inline volume's attributes on the CSI socket, run the container's
command in a private mount namespace with the published view bind-mounted at /nix/store, and
NodeUnpublishVolume when the pod goes. The pod sees exactly the closure, like a real pod.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from niphas_csi.proto import csi_pb2, csi_pb2_grpc

POD_INFO = {
    "csi.storage.k8s.io/ephemeral": "true",
    "csi.storage.k8s.io/pod.namespace": "default",
    "csi.storage.k8s.io/serviceAccount.name": "default",
}


@dataclass(frozen=True)
class PodSpec:
    """What the kubelet needs from a rendered Deployment."""

    command: list[str]
    env: dict[str, str]
    volume_attributes: dict[str, str]
    mount_path: str

    @property
    def store_path(self) -> str:
        return self.volume_attributes["storePath"]

    @classmethod
    def from_deployment(cls, manifest: dict[str, Any]) -> PodSpec:
        pod = manifest["spec"]["template"]["spec"]
        container = pod["containers"][0]
        volume = next(v for v in pod["volumes"] if "csi" in v)
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        env = {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}
        command = [*container["command"], *container.get("args", [])]
        attributes = {k: str(v) for k, v in volume["csi"]["volumeAttributes"].items()}
        return cls(command, env, attributes, mount["mountPath"])


def read_deployment(path: Path) -> PodSpec | None:
    if not path.exists():
        return None
    return PodSpec.from_deployment(yaml.safe_load(path.read_text()))


@dataclass
class Pod:
    """One running pod: its volume, its target and the app process."""

    spec: PodSpec
    uid: str
    target: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = field(default=None)

    @property
    def volume_id(self) -> str:
        return f"csi-{self.uid}"


class Kubelet:
    def __init__(self, socket: Path, pods_dir: Path, node_id: str = "demo-node") -> None:
        self._socket = socket
        self._pods_dir = pods_dir
        self._node_id = node_id
        self._channel: grpc.aio.Channel | None = None
        self.pods: list[Pod] = []

    async def __aenter__(self) -> Kubelet:
        self._channel = grpc.aio.insecure_channel(f"unix://{self._socket}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for pod in list(self.pods):
            await self.delete(pod)
        if self._channel is not None:
            await self._channel.close()

    @property
    def _node(self) -> csi_pb2_grpc.NodeStub:
        assert self._channel is not None
        return csi_pb2_grpc.NodeStub(self._channel)  # type: ignore[no-untyped-call]

    async def publish(self, spec: PodSpec, timeout_s: float = 120.0) -> Pod:
        """NodePublishVolume as kubelet calls it for an inline ephemeral volume."""
        uid = uuid.uuid4().hex[:12]
        parent = self._pods_dir / uid / "volumes" / "kubernetes.io~csi" / "closure"
        parent.mkdir(parents=True, exist_ok=True)
        pod = Pod(spec, uid, parent / "mount")
        context = {
            **spec.volume_attributes,
            **POD_INFO,
            "csi.storage.k8s.io/pod.name": f"web-{uid}",
            "csi.storage.k8s.io/pod.uid": uid,
        }
        request = csi_pb2.NodePublishVolumeRequest(
            volume_id=pod.volume_id,
            target_path=str(pod.target),
            volume_capability=csi_pb2.VolumeCapability(
                mount=csi_pb2.VolumeCapability.MountVolume(),
                access_mode=csi_pb2.VolumeCapability.AccessMode(
                    mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY
                ),
            ),
            readonly=True,
            volume_context=context,
        )
        # As kubelet does: a driver still starting (its socket refusing) is waited for.
        await self._node.NodePublishVolume(request, timeout=timeout_s, wait_for_ready=True)
        self.pods.append(pod)
        return pod

    def start(self, pod: Pod, log: Path) -> None:
        """Run the container's command with the volume at its mountPath, in a private mount
        namespace (the host's /nix/store stays untouched)."""
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
        argv += [str(pod.target), pod.spec.mount_path, *pod.spec.command]
        env = {"PATH": "/usr/bin:/bin", **pod.spec.env}
        pod.log = log
        with log.open("ab") as out:
            pod.process = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    async def delete(self, pod: Pod) -> None:
        """Stop the app (SIGTERM, then SIGKILL), then NodeUnpublishVolume."""
        if pod.process is not None and pod.process.poll() is None:
            os.killpg(pod.process.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(pod.process.wait, 5)
            except subprocess.TimeoutExpired:
                os.killpg(pod.process.pid, signal.SIGKILL)
                await asyncio.to_thread(pod.process.wait)
        request = csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=pod.volume_id, target_path=str(pod.target)
        )
        await self._node.NodeUnpublishVolume(request, timeout=60, wait_for_ready=True)
        shutil.rmtree(self._pods_dir / pod.uid, ignore_errors=True)
        if pod in self.pods:
            self.pods.remove(pod)
