"""Where the node keeps its files, and the fixed names it uses on the host.

One node per host: kubelet's root dir, the bridge and the pod subnet are host-wide. The state
dir persists across runs only for containerd's image store (images are not imported again);
everything else is made fresh at each start and removed at teardown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

NODE_NAME = "127.0.0.1"
"""kubelet refuses a loopback node IP but accepts it as the node's name; the apiserver then
reaches the kubelet by that name (`--kubelet-preferred-address-types=Hostname,...`)."""

BRIDGE = "niphas0"
POD_SUBNET = "10.88.0.0/24"
GATEWAY = "10.88.0.1"
"""The host's address on the pod network (the bridge's): where pods reach services that run
as host processes, e.g. a test's cache or the builder's staging endpoint."""
KUBELET_PORT = 10250
PAUSE_IMAGE = "niphas.local/pause:3.4"
SERVICE_CIDR = "10.96.0.0/24"
API_SERVICE_IP = "10.96.0.1"
"""The `kubernetes` Service's ClusterIP (the first address of SERVICE_CIDR)."""
CLUSTER_DOMAIN = "cluster.local"


def kube_cache() -> Path:
    """The binaries of `scripts/setup-kube.sh`."""
    root = os.environ.get("NIPHAS_KUBE_CACHE", "/var/cache/niphas/kube-apiserver")
    return Path(root) / "current"


@dataclass(frozen=True)
class Layout:
    state: Path = Path(os.environ.get("NIPHAS_CLUSTER_STATE", "/var/lib/niphas-cluster"))
    run: Path = Path(os.environ.get("NIPHAS_CLUSTER_RUN", "/run/niphas-cluster"))
    kubelet_root: Path = Path("/var/lib/kubelet")

    @property
    def containerd_root(self) -> Path:
        return self.state / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def work(self) -> Path:
        """Fresh at each start: etcd data, certificates, configs, logs."""
        return self.state / "node"

    @property
    def logs(self) -> Path:
        """Kept after teardown (a failed start is read there), emptied at the next start."""
        return self.state / "logs"

    @property
    def pids(self) -> Path:
        return self.run / "pids"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.work / "admin.kubeconfig"

    @property
    def host_snapshot(self) -> Path:
        """What the host looked like before the node started (sysctls, iptables, mounts)."""
        return self.run / "host-before.json"

    @property
    def lock(self) -> Path:
        return Path("/run/niphas-cluster.lock")
