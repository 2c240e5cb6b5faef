"""containerd with the CRI plugin, runc and a CNI bridge, configured for this node only
(its own root, state dir and socket, so a system containerd is never touched).

Pods get addresses on a bridge the host holds the gateway address of, with no default route
and no masquerading: the host reaches pod IPs and pods reach each other and Services (their
range is routed through the gateway, where kube-proxy's rules are), nothing else.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from .layout import BRIDGE, GATEWAY, PAUSE_IMAGE, POD_SUBNET, SERVICE_CIDR, Layout
from .processes import spawn

CNI_BIN = Path("/usr/lib/cni")
NAMESPACE = "k8s.io"
"""containerd namespace the CRI plugin keeps Kubernetes' images and containers in."""


def containerd_config(layout: Layout) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""\
version = 2
root = "{layout.containerd_root}"
state = "{layout.run / "containerd"}"

[grpc]
  address = "{layout.containerd_socket}"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # This VM lacks CAP_SYS_RESOURCE: runc cannot lower an OOM score, so never ask it to.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{layout.work / "cni"}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{layout.state / "opt"}"
"""


def cni_config(layout: Layout) -> dict[str, object]:
    return {
        "cniVersion": "0.4.0",
        "name": "niphas",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    # Services through the host (kube-proxy); still no default route.
                    "routes": [{"dst": SERVICE_CIDR, "gw": GATEWAY}],
                    "dataDir": str(layout.work / "cni-ipam"),
                },
            }
        ],
    }


def start_containerd(layout: Layout) -> None:
    for binary in ("containerd", "runc", "containerd-shim-runc-v2"):
        if shutil.which(binary) is None:
            raise RuntimeError(f"{binary} not found: run scripts/setup-node.sh")
    conf = layout.work / "containerd.toml"
    conf.write_text(containerd_config(layout))
    cni = layout.work / "cni"
    cni.mkdir(parents=True, exist_ok=True)
    (cni / "10-niphas.conflist").write_text(json.dumps(cni_config(layout), indent=2))
    layout.run.mkdir(parents=True, exist_ok=True)
    make_bridge()
    spawn(layout, "containerd", ["containerd", "--config", str(conf)])


def make_bridge() -> None:
    """The bridge with its gateway address before any pod exists (the CNI plugin adopts it),
    so host processes can listen on the pod network from the start."""
    prefix = POD_SUBNET.split("/")[1]
    for argv in (
        ["ip", "link", "add", BRIDGE, "type", "bridge"],
        ["ip", "addr", "add", f"{GATEWAY}/{prefix}", "dev", BRIDGE],
        ["ip", "link", "set", BRIDGE, "up"],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0 and "File exists" not in done.stderr:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def ctr(layout: Layout, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ctr", "--address", str(layout.containerd_socket), "-n", NAMESPACE, *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=600,
    )


def image_present(layout: Layout, ref: str) -> bool:
    listed = ctr(layout, "images", "list", "-q", check=False).stdout.split()
    return ref in listed


def import_image(layout: Layout, archive: Path, ref: str) -> None:
    """Import (and unpack) an OCI archive whose index tags the image with `ref`'s tag
    (`org.opencontainers.image.ref.name`); ctr prefixes the tag with the repository."""
    repository = ref.rsplit(":", 1)[0]
    done = ctr(layout, "images", "import", "--base-name", repository, str(archive), check=False)
    if done.returncode != 0 or not image_present(layout, ref):
        raise RuntimeError(f"importing {archive} as {ref} failed: {done.stderr.strip()[-400:]}")


def remove_all_containers(layout: Layout) -> None:
    """Kill and delete every task and container of the CRI namespace (teardown, after
    kubelet stopped): their shims, mounts and cgroups go with them."""
    for task in ctr(layout, "tasks", "list", "-q", check=False).stdout.split():
        ctr(layout, "tasks", "kill", "-s", "SIGKILL", task, check=False)
    for task in ctr(layout, "tasks", "list", "-q", check=False).stdout.split():
        ctr(layout, "tasks", "delete", "-f", task, check=False)
    for container in ctr(layout, "containers", "list", "-q", check=False).stdout.split():
        ctr(layout, "containers", "delete", container, check=False)
