"""The demo's stack (`niphas up`: NATS and the five services as host processes) with the real
node in place of render mode and the kubelet stand-in: the operator reconciles in cluster mode
against the node's apiserver, the CSI driver registers with the real kubelet and mounts into
its pods, the mesh serves the node's chroot store. The pods are the kubelet's."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from rich.console import Console

from niphas_cluster.layout import NODE_NAME, PAUSE_IMAGE
from niphas_cluster.node import Node
from niphas_demo.flow import Demo
from niphas_demo.layout import NAMESPACE, WORKLOAD, Layout, workload_yaml
from niphas_demo.on_cluster import serving
from niphas_demo.stack import Stack
from tests.kube_harness import REPO_ROOT
from tests.node_harness import Kubectl

KUBELET_ROOT = Path("/var/lib/kubelet")
CSI_SOCKET = KUBELET_ROOT / "plugins" / "csi.niphas.io" / "csi.sock"
CRD = REPO_ROOT / "deploy" / "kustomize" / "base" / "crd" / "niphasworkloads.yaml"
CSI_DRIVER = REPO_ROOT / "deploy" / "kustomize" / "base" / "csi" / "csidriver.yaml"


@dataclass(frozen=True)
class NodeLayout(Layout):
    @property
    def csi_socket(self) -> Path:
        return CSI_SOCKET


class NodeDemo(Demo):
    def __init__(self, state: Path, node: Node, kubectl: Kubectl) -> None:
        super().__init__(state, Console(quiet=True))
        self.layout = NodeLayout(state)
        self.node = node
        self.kubectl = kubectl

    def node_env(self, env: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in env.items() if not k.startswith("NIPHAS_OPERATOR_WORK")}
        env.pop("NIPHAS_OPERATOR_RENDER_DIR", None)
        kubeconfig = str(self.node.kubeconfig)
        return {
            **env,
            "KUBECONFIG": kubeconfig,
            "NIPHAS_OPERATOR_KUBECONFIG": kubeconfig,
            "NIPHAS_OPERATOR_STUB_IMAGE": PAUSE_IMAGE,
            "NIPHAS_OPERATOR_PREHEAT_NODES": json.dumps([NODE_NAME]),
            "NIPHAS_MESH_NODE": NODE_NAME,
            "NIPHAS_CSI_NODE_ID": NODE_NAME,
            "NIPHAS_CSI_ENDPOINT": f"unix://{CSI_SOCKET}",
            "NIPHAS_CSI_ALLOWED_TARGET_ROOT": str(KUBELET_ROOT / "pods"),
            "NIPHAS_CSI_REGISTRATION_DIR": str(KUBELET_ROOT / "plugins_registry"),
            # A path no holder has fails the mount after this long (kubelet then retries).
            "NIPHAS_CSI_FETCH_TIMEOUT_S": "15",
        }

    def install(self) -> None:
        """What a cluster admin applies before the platform runs: CRD, CSIDriver, the
        operator's Lease namespace, the store label on the node; then the workload."""
        self.kubectl("apply", "-f", str(CRD))
        self.kubectl("apply", "-f", str(CSI_DRIVER))
        self.kubectl("create", "namespace", "niphas-system", check=False)
        self.kubectl("label", "--overwrite", "node", NODE_NAME, "niphas.io/store=true")
        self.kubectl("wait", "--for=condition=established", "crd/niphasworkloads.niphas.io")
        assert self.repo is not None
        self.kubectl("apply", "-f", "-", input=workload_yaml(self.repo.flake_ref, self.ports.app))

    async def start_on_node(self, env: dict[str, str]) -> None:
        log = self.layout.demo / "niphas-up.log"
        self.stack = Stack(self.layout, self.ports, env, log)
        self.stack.start()
        await self.stack.wait_ready()
        self.nc = await nats.connect(self.stack.nats_url, name="niphas-node-test")

    def pods(self) -> list[dict[str, Any]]:
        out = self.kubectl(
            "-n", NAMESPACE, "get", "pods", "-l", f"app.kubernetes.io/name={WORKLOAD}",
            "-o", "json",
        ).stdout  # fmt: skip
        items: list[dict[str, Any]] = json.loads(out)["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    async def serving(self, version: str, timeout_s: float = 180) -> tuple[str, str]:
        """Wait until the workload's one ready pod answers with `version`: (pod uid, page)."""
        return await serving(self.pods, self.ports.app, version, timeout_s)

    async def close_on_node(self) -> None:
        """Workload deleted (its pods unpublished by the kubelet) before the stack stops."""
        self.kubectl("-n", NAMESPACE, "delete", "nw", WORKLOAD, "--wait=false", check=False)
        for _ in range(300):
            if not self.kubectl(
                "-n", NAMESPACE, "get", "pods", "-o", "name", check=False
            ).stdout.strip():
                break
            await asyncio.sleep(0.2)
        await self.close()


def closure_pod(name: str, store_path: str) -> str:
    """A pod mounting `store_path` through the driver, as a user would write it."""
    return f"""\
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
  containers:
    - name: c
      image: {PAUSE_IMAGE}
      volumeMounts: [{{name: closure, mountPath: /nix/store, readOnly: true}}]
  volumes:
    - name: closure
      csi:
        driver: csi.niphas.io
        readOnly: true
        volumeAttributes: {{storePath: "{store_path}"}}
"""


def mount_failures(kubectl: Kubectl, pod: str) -> list[str]:
    """Messages of the pod's FailedMount events."""
    out = kubectl(
        "-n", NAMESPACE, "get", "events", "-o", "json",
        "--field-selector", f"involvedObject.name={pod},reason=FailedMount",
    ).stdout  # fmt: skip
    return [str(e.get("message", "")) for e in json.loads(out)["items"]]


def node_mounts(below: Path) -> list[str]:
    prefix = str(below) + "/"
    return [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(prefix)
    ]
