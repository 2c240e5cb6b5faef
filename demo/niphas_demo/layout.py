"""Where the demo keeps everything (all under the state dir, so a second run reuses it) and the
settings it gives each service: the embedded default configured for one node.

The node's store is a chroot store under the state dir (`node/`), served by the mesh agent and
mounted from by the CSI driver; the builder builds in the host store and pushes to the signed
file cache (`cache/`). So the closure reaches the node the way it reaches any node in a
cluster: `path.wanted` -> the mesh fetches it from the cache, verified against the builder's
key. The host store keeps only what Nix needs to evaluate and build.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

REPO_NAME = "niphas/demo-web"
WORKLOAD = "web"
NAMESPACE = "default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Ports:
    eval: int
    mesh: int
    builder_metrics: int
    operator_metrics: int
    csi_metrics: int
    app: int

    @classmethod
    def pick(cls) -> Ports:
        return cls(*(free_port() for _ in range(6)))


@dataclass(frozen=True)
class Layout:
    state: Path

    @property
    def demo(self) -> Path:
        return self.state / "demo"

    @property
    def repo(self) -> Path:
        return self.demo / "forge" / "demo-web"

    @property
    def secrets_file(self) -> Path:
        return self.demo / "webhook-secrets.yaml"

    @property
    def key_file(self) -> Path:
        return self.state / "builder" / "cache-key.sec"

    @property
    def cache(self) -> Path:
        return self.state / "cache"

    @property
    def node_store(self) -> Path:
        return self.state / "node"

    @property
    def pods(self) -> Path:
        """kubelet's pods dir stand-in: volumes are only mounted below it."""
        return self.demo / "kubelet" / "pods"

    @property
    def workloads(self) -> Path:
        return self.state / "operator" / "workloads"

    @property
    def render(self) -> Path:
        return self.state / "operator" / "render"

    @property
    def status(self) -> Path:
        """The operator's file store: each workload's status (what kubectl would show)."""
        return self.state / "operator" / "status"

    @property
    def csi_socket(self) -> Path:
        return self.state / "csi" / "csi.sock"

    def deployment(self) -> Path:
        return self.render / NAMESPACE / WORKLOAD / "deployment.yaml"

    def workload_status(self) -> Path:
        return self.status / NAMESPACE / f"{WORKLOAD}.json"


def service_env(layout: Layout, ports: Ports, public_key: str, tools: str) -> dict[str, str]:
    """Every setting the demo gives the services (names as `niphas settings` lists them);
    `tools` is the store path of the sample's builder tools, its one non-git input."""
    node = "demo-node"
    return {
        "NIPHAS_STATE_DIR": str(layout.state),
        # eval: webhooks on a loopback port, only the sample repository (and its tools, a
        # store path) may be evaluated.
        "NIPHAS_EVAL_LISTEN": f"127.0.0.1:{ports.eval}",
        "NIPHAS_EVAL_WEBHOOK_SECRETS_FILE": str(layout.secrets_file),
        "NIPHAS_EVAL_ALLOWED_REFS": json.dumps([f"file://{layout.repo}", f"path:{tools}"]),
        # builder: the host store, the signed file cache under the state dir.
        "NIPHAS_BUILDER_CACHE_URL": f"file://{layout.cache}",
        "NIPHAS_BUILDER_SECRET_KEY_FILE": str(layout.key_file),
        "NIPHAS_BUILDER_METRICS_PORT": str(ports.builder_metrics),
        "NIPHAS_BUILDER_METRICS_HOST": "127.0.0.1",
        # operator: render mode (no cluster), the sample workload in its workloads dir.
        "NIPHAS_OPERATOR_WORKLOADS_DIR": str(layout.workloads),
        "NIPHAS_OPERATOR_RENDER_DIR": str(layout.render),
        "NIPHAS_OPERATOR_METRICS_PORT": str(ports.operator_metrics),
        # mesh: the node's chroot store, the builder's cache served beside it, its key trusted.
        "NIPHAS_MESH_NODE": node,
        "NIPHAS_MESH_LISTEN": f"127.0.0.1:{ports.mesh}",
        "NIPHAS_MESH_STORE_ROOT": str(layout.node_store),
        "NIPHAS_MESH_CACHE_DIR": str(layout.cache),
        "NIPHAS_MESH_TRUSTED_PUBLIC_KEYS": public_key,
        # The demo's store is tiny and nobody else writes it: scan for changes rarely.
        "NIPHAS_MESH_RESCAN_INTERVAL_S": "30",
        # csi: the same node and store, the socket and records under the state dir.
        "NIPHAS_CSI_ENDPOINT": f"unix://{layout.csi_socket}",
        "NIPHAS_CSI_NODE_ID": node,
        "NIPHAS_CSI_STORE_ROOT": str(layout.node_store),
        "NIPHAS_CSI_STATE_DIR": str(layout.state),
        "NIPHAS_CSI_ALLOWED_TARGET_ROOT": str(layout.pods),
        "NIPHAS_CSI_METRICS_PORT": str(ports.csi_metrics),
    }


def metrics_urls(ports: Ports) -> dict[str, str]:
    return {
        "eval": f"http://127.0.0.1:{ports.eval}/metrics",
        "builder": f"http://127.0.0.1:{ports.builder_metrics}/metrics",
        "operator": f"http://127.0.0.1:{ports.operator_metrics}/metrics",
        "csi": f"http://127.0.0.1:{ports.csi_metrics}/metrics",
        "mesh": f"http://127.0.0.1:{ports.mesh}/metrics",
    }


def workload_yaml(flake_ref: str, app_port: int, host: str | None = None) -> str:
    """The sample workload; `host`: the address the app binds (default all: a pod's)."""
    bind = f'\n    - {{name: HOST, value: "{host}"}}' if host else ""
    return f"""\
apiVersion: niphas.io/v1alpha1
kind: NiphasWorkload
metadata:
  name: {WORKLOAD}
  namespace: {NAMESPACE}
spec:
  flakeRef: {flake_ref}
  attribute: default
  replicas: 1
  env:
    - {{name: PORT, value: "{app_port}"}}{bind}
  ports:
    - {{name: http, containerPort: {app_port}}}
  service:
    ports:
      - {{name: http, port: 80, targetPort: {app_port}}}
"""


def secrets_yaml(secret: str, clone_url: str | None = None) -> str:
    """The webhook secret of the sample repository; `clone_url` pins what is evaluated (a
    `file://` repository must be pinned: the ingress never takes one from a payload)."""
    pinned = f'  clone_url: "{clone_url}"\n' if clone_url else ""
    return f'{REPO_NAME}:\n  forge: github\n  secret: "{secret}"\n{pinned}'
